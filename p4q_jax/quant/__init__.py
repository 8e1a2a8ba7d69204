"""Post-training quantization of CLIP: quantizers, observers, configs, calibration.

    qconfig = quant.QConfig.parse("w4a4attn8")
    qstate = quant.calibrate(model, params, qconfig, images=image_batches, texts=prompts)
    img_q = clip.encode_image(model, params, images, qstate=qstate)
"""

from p4q_jax.quant.calibration import calibrate
from p4q_jax.quant.calibration import calibrate_module
from p4q_jax.quant.compensation import compensate
from p4q_jax.quant.fold import fold_batchnorm
from p4q_jax.quant.qconfig import QConfig
from p4q_jax.quant.qconfig import QuantSpec
from p4q_jax.quant.qconfig import Rule
from p4q_jax.quant.state import QParams
from p4q_jax.quant.state import QState
