"""Moved to `lvm/config.py` (the schema lives in the package): import `lvm.config` instead.

Only `lvm/generate.py` and `lvm/hf/__init__.py` still import this name; remove this file once
they import `lvm.config`.
"""

# pylint: disable=unused-import
from lvm.config import CLIP_MEAN, CLIP_STD, DEFAULT_RULES, SIGLIP_MEAN, SIGLIP_STD
from lvm.config import decoder_config, get_config, parse_arg, projector_config, vision_config
