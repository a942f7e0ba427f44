"""absl entry points: rvs-train, rvs-evaluate, rvs-export."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: keep the console readable
