"""Models: the exact Gaussian-mixture denoiser (test oracle and quality benchmark), the UNet, bundled models."""
from .bundled import BUNDLED, load_bundled
from .gmm import GaussianMixture
from .unet import UNET_CONFIGS, EDMUNet, UNetConfig, build_unet

__all__ = ["GaussianMixture", "EDMUNet", "UNetConfig", "UNET_CONFIGS", "build_unet", "load_bundled", "BUNDLED"]
