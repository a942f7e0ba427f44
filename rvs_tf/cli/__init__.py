"""absl entry points: rvs-train, rvs-evaluate, rvs-export."""
