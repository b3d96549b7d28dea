"""PEFT methods (peft 0.21.2 ``PeftType``) that deltaserve refuses, each with the reason in one line.

Served, for comparison: LoRA (with DoRA, ``lora_bias``, trainable tokens), AdaLoRA, VeRA (expanded
into LoRA), (IA)3, BEFT and trainable tokens. Everything here either needs a dense per-tenant copy of
a weight (its update is full rank, or it multiplies or reads the base weight), or mixes in state that
a per-token delta cannot carry; a few are low-rank in disguise but their expansion is not written.
Prompt-learning types are served or refused in ``peft_prompt.py`` (``REFUSED_PROMPT_TYPES``).
"""
from __future__ import annotations

DENSE = "a dense per-tenant weight copy, not a low-rank add-on"

REFUSED_TYPES: dict[str, str] = {
    "LOHA": f"LoHa's update (B1 A1) * (B2 A2) is a Hadamard product of rank up to r^2; serving it needs {DENSE}",
    "LOKR": f"LoKr's update kron(W1, W2) is a Kronecker product of rank rank(W1) * rank(W2), full in general; {DENSE}",
    "OFT": f"OFT multiplies the base weight by a learned block-orthogonal matrix; {DENSE}",
    "BOFT": f"BOFT multiplies the base weight by a butterfly-factorised orthogonal matrix; {DENSE}",
    "HRA": f"HRA multiplies the base weight by a chain of Householder reflections; {DENSE}",
    "PSOFT": "PSOFT rotates an SVD subspace of the base weight (B (R - I) A with trained R); expanding it into "
             "LoRA is not implemented",
    "FOURIERFT": f"FourierFT's update is the inverse 2-D FFT of sparse spectral coefficients, full rank; {DENSE}",
    "WAVEFT": f"WaveFT's update is an inverse wavelet transform of sparse coefficients, full rank; {DENSE}",
    "SHIRA": f"SHiRA trains a sparse high-rank set of weight entries; {DENSE}",
    "SUPERTUNING": f"Super-Tuning trains a sparse set of base-weight entries (high rank); {DENSE}",
    "RANDLORA": f"RandLoRA sums many scaled random bases into a full-rank update; {DENSE}",
    "C3A": f"C3A's update is a block-circulant convolution, full rank; {DENSE}",
    "MISS": f"MiSS adds a shared trainable block to every block of the weight (high rank); {DENSE}",
    "HIRA": f"HiRA's update W * (B A) is a Hadamard product with the base weight, full rank; {DENSE}",
    "GLORA": f"GLoRA scales the base weight elementwise (W * A + B); {DENSE}",
    "DEFT": f"DEFT replaces a subspace of the base weight ((I - P) W + Q R); {DENSE}",
    "ADAMSS": f"AdaMSS re-trains SVD subspaces of the base weight; {DENSE}",
    "OSF": f"OSF fine-tunes the base weight's low-singular-value subspace; {DENSE}",
    "FROD": f"FRoD re-parameterises the whole weight as U (S + diag(l)) V^T around its SVD; {DENSE}",
    "TINYLORA": "TinyLoRA builds its update from the base weight's SVD and fixed random tensors; expanding it "
                "into LoRA is not implemented",
    "PEANUT": f"PEANuT computes its update with a small network applied to the base weight; {DENSE}",
    "ROAD": "RoAd rotates pairs of output channels per adapter (y'_i = a_i y_i - b_i y_j), a channel-mixing op "
            "deltaserve does not have",
    "LN_TUNING": "LN tuning replaces whole LayerNorm/RMSNorm weights; norms take only bias deltas here",
    "DELORA": "DeLoRA normalises its rank components by their norms and the base weight's norm; expanding it "
              "into LoRA is not implemented",
    "GRALORA": "GraLoRA trains a separate LoRA per weight block (rank up to k^2 r); expanding it is not implemented",
    "VBLORA": "VB-LoRA mixes its A and B from a shared vector bank by top-k logits; expanding it into LoRA is not "
              "implemented",
    "UNILORA": "Uni-LoRA draws every LoRA parameter from one shared vector; expanding it is not implemented",
    "PVERA": "PVeRA samples its scaling at training time (a probabilistic VeRA); its inference rule is not "
             "implemented",
    "LILY": "Lily routes each input to a data-dependent mixture of shared projectors (a router per layer)",
    "XLORA": "X-LoRA mixes LoRA experts with a learned classifier that runs the model twice per token",
    "POLY": "Poly/MHR routes each task id to a learned mixture of LoRA modules; requests carry no task id",
    "SHADOW": "ShadowPEFT runs a parallel shadow network beside the decoder; not a per-layer delta",
}


def refusal_reason(peft_type: str) -> str | None:
    return REFUSED_TYPES.get(peft_type)
