"""HF <-> megatron-core checkpoint conversion and its verifier.

- ``hf_to_megatron.convert_hf_to_megatron``: HF safetensors -> torch_dist checkpoint + model.json.
- ``megatron_to_hf.convert_megatron_to_hf``: a model or training dist checkpoint -> HF safetensors.
- ``verify.verify``: logits of the HF model vs the megatron checkpoint at a TP/PP layout.
- ``cli``: the command lines behind ``tools/convert_*.py`` and ``tools/verify_conversion.py``.

The name map and split/merge functions live in ``megatron_opsd.models.hf_mapping``.
"""
