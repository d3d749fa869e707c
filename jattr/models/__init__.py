"""Models: a small UNet in flax NNX (unconditional, class- or cross-attention-conditional),
the bridge to a pure ``apply_fn(params, x_t, t[, cond])``, LoRA, and a small autoencoder."""

from jattr.models.bridge import kfac_apply_fn
from jattr.models.bridge import make_apply_fn
from jattr.models.bridge import make_init_fn
from jattr.models.bridge import make_layered_apply_fn
from jattr.models.bridge import make_model
from jattr.models.bridge import merge_model
from jattr.models.bridge import null_condition
from jattr.models.bridge import num_params
from jattr.models.bridge import split_model
from jattr.models.layers import route_layers
from jattr.models.lora import LORA_BASE
from jattr.models.lora import LORA
from jattr.models.lora import lora_apply_fn
from jattr.models.lora import lora_init
from jattr.models.lora import lora_merge
from jattr.models.lora import lora_model
from jattr.models.lora import lora_num_params
from jattr.models.lora import lora_scale
from jattr.models.lora import lora_targets
from jattr.models.unet import UNet
from jattr.models.unet import UNetConfig
from jattr.models.unet import cifar_30m_config
from jattr.models.unet import cifar_config
from jattr.models.unet import config_by_name
from jattr.models.unet import digits_config
from jattr.models.unet import fashion_mnist_config
from jattr.models.autoencoder import Autoencoder
from jattr.models.autoencoder import AutoencoderConfig
from jattr.models.autoencoder import AutoencoderFns
from jattr.models.autoencoder import autoencoder_space
from jattr.models.autoencoder import latent_scale
from jattr.models.autoencoder import make_autoencoder_fns
from jattr.models.autoencoder import train_autoencoder
