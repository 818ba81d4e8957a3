"""Decoding for masked diffusion LMs: one loop (loop.py), three transition families, SM for free.

    from smdlm_cli.core.samplers import decode
    out = decode(model, x, sampler="mdlm", steps=128, softmask=sm, generator_seeds=[0, 1], top_p=0.9)
    out.tokens, out.nfe, out.skipped, out.trace

Samplers: mdlm (ancestral, MDLM/ReMDM reference semantics), remdm-cap and remdm-loop (ReMDM
remasking), confidence (Dream/LLaDA: origin, maskgit_plus, topk_margin, entropy; blocks).
`softmask=None` is binary decoding; a SoftMask turns on the feedback of the previous forward.

Not here: models, checkpoints, tokenizers, the CLI (commands/sample.py builds on this).
"""

from smdlm_cli.core.samplers.loop import (SAMPLERS, SM_SCHEDULES, DecodeResult, decode,
                                          validate_sampler_args)

__all__ = ["SAMPLERS", "SM_SCHEDULES", "DecodeResult", "decode", "validate_sampler_args"]
