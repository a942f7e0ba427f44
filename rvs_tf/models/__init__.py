"""Classifiers (logits out, a ``features`` layer inside) and the RVS perturbation generator."""
from rvs_tf.models.classifier import (ARCHITECTURES, FEATURES_LAYER, NORMALIZATIONS,
                                      PerImageStandardization, ZeroPadChannels, build_classifier,
                                      preact_resnet18, small_cnn, wide_resnet, with_features)
from rvs_tf.models.generator import make_generator, make_init_generator

__all__ = ["ARCHITECTURES", "FEATURES_LAYER", "NORMALIZATIONS", "PerImageStandardization",
           "ZeroPadChannels", "build_classifier", "make_generator", "make_init_generator", "preact_resnet18",
           "small_cnn", "wide_resnet", "with_features"]
