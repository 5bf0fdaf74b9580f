"""Models of the field: SmallCNN and its wider variant (28x28), VGG16-BN and CIFAR ResNet-18 (32x32 and 64x64).

Every model takes an optional input normalisation as its first layer (``model.normalize``), so
attacks operate on [0, 1] pixels. ``build_model(name, ...)`` builds any of them by name.
"""

from .registry import MODEL_NAMES, build_model, default_lr, default_max_grad_norm
from .recurrent import RECURRENT_MODELS, SequenceClassifier, recurrent_classifier
from .resnet import BasicBlock, ResNet, resnet18
from .small_cnn import SmallCNN, small_cnn, wide_cnn
from .vgg import VGG, VGG16_CONFIG, VGG_CNN_CONFIG, vgg16, vgg_cnn

__all__ = ["MODEL_NAMES", "build_model", "default_lr", "default_max_grad_norm",
           "BasicBlock", "ResNet", "resnet18", "SmallCNN", "small_cnn", "wide_cnn",
           "VGG", "VGG16_CONFIG", "vgg16", "VGG_CNN_CONFIG", "vgg_cnn",
           "RECURRENT_MODELS", "SequenceClassifier", "recurrent_classifier"]
