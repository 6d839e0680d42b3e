"""Test session setup: 8 fake CPU devices for the sharding tests (must be set before JAX starts), and a
private cache directory for the demo model, presets and the XLA compilation cache."""

import os
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("INTERNVL_JAX_CACHE", tempfile.mkdtemp(prefix="internvl-jax-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
