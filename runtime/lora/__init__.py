"""LoRA files applied at run time: merged into the exported graphs' initializers, no re-export, no PyTorch.

formats (files -> layers), keys (layer names -> model weights), merge (updates -> initializers through the
weight map), apply (merged sessions cached per LoRA set), library (files by name, folder listings).
"""
from __future__ import annotations

import copy
from dataclasses import replace

from .library import list_loras  # noqa: F401  (the /sdapi/v1/loras listing)


def lora_view(pipe, request):
    """(pipeline to run, request): prompt tags `<lora:name:w>` taken out; with any LoRA, a view of `pipe` whose
    model has the merged graphs and a request without LoRAs; else (pipe, request) unchanged."""
    from ..a1111.extra_networks import take_lora_tags

    prompts, tagged = take_lora_tags(request.prompt)
    wanted = tuple(pipe.loras) + tuple(request.loras) + tagged
    if not wanted:
        return pipe, request if prompts == request.prompt else replace(request, prompt=prompts)
    view = copy.copy(pipe)
    view.model = pipe.lora_cache.model_for(wanted, pipe.lora_dir, pipe.lora_partial)
    view.loras = ()
    return view, replace(request, prompt=prompts, loras=())
