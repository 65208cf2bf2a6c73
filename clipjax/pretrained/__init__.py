"""Published CLIP and SigLIP checkpoints in and out of clipjax (`python -m clipjax.convert`).

`tensors` reads checkpoint files into numpy (safetensors without torch; PyTorch pickles and
TorchScript archives with it), `layouts` maps the tensors of open_clip / OpenAI CLIP, Hugging Face
`CLIPModel` and `SiglipModel` onto clipjax's parameters and back, each source tensor used exactly
once, and `workdir` writes the result as a normal clipjax workdir (docs/pretrained.md).
"""
