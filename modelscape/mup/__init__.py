"""Parameterizations (sp, ntp, mup, mfp, ntp-lr, mup-lr), GAMMA richness and the coordinate check.

The semantics for weight layers are those of D. Karkada's ``mupify`` (not on the package registry, so written
here from its math). A weight layer computes ``mult * (W x + b)``; ``parameterize`` sets, per layer, the
output multiplier ``mult``, the init std of ``W`` and the learning-rate factor of its optimizer parameter
group. Weight layers are ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding``. The read-in and the read-out
are the modules the model names (``input_layer`` / ``output_layer`` attributes, or ``parameterize``'s
arguments), checked by a forward pass: they must be the first and the last weight layer the data goes
through. The other Linear/Conv layers are hidden. The model width ``n`` is the largest out-dim of every layer
but the read-out, and a layer's fan-in is ``prod(weight.shape[1:])``. With ``a = sqrt(n)`` for mup, mfp,
mup-lr and ``a = 1`` for ntp, ntp-lr, and ``q = a**2 / fan_in`` (read-in, hidden) or ``q = 1 / fan_in``
(read-out):

==============  ============  ==============  ==============
param           multiplier    init std        SGD lr factor
==============  ============  ==============  ==============
mup-lr, ntp-lr  1             sqrt(q) / a     q
mup             sqrt(q)       1 / a           1
mfp, ntp        sqrt(q) / a   1               a**2
==============  ============  ==============  ==============

Within a family the three choices are the same network: the effective weight ``mult * W`` starts with std
``sqrt(q) / a`` and SGD moves it with learning rate ``lr * q`` (``lr_factor * mult**2 = q``). ntp and mup
differ only at the read-out, whose effective init is ``1/sqrt(n)`` times smaller under mup. Adaptive
optimizers (Adam and friends) get their own learning-rate factors; see ``effective_scales``.

Vector-like parameters (one dimension that grows with width: biases, LayerNorm / RMSNorm / GroupNorm gains
and biases, Embedding tables) follow Tensor Programs V (Table 3), which treats them like input weights. A bias
is a weight on a constant input coordinate, so it learns like one weight of the read-in: effective SGD rate
``a**2 / d_in`` (``d_in`` the read-in's fan-in; at the read-out ``1 / d_in``), growing like the width under
muP, and the read-in's width-independent effective Adam rate; its effective init is width-independent (biases
0, norm gains 1). An embedding is a read-in whose one-hot input has fan-in 1 (init std 1); when it is the
model's read-in, as in a GPT, d_in is 1. Their updates, and what those updates do to the activations, then do
not change with width, and at width ``d_in`` they learn as they did before this rule. A bias shares its
layer's multiplier (init and lr factor are divided by it); norms and embeddings have none. Every ``nn.ReLU``
gets the multiplier sqrt(2) (``relu_gain``), and attention modules with ``attn_mult`` and ``d_head``
(``modelscape.models.SelfAttention``) get muP's ``1/d_head`` attention scale under the mup family.

Weight decay is divided by each group's learning-rate factor, so that ``lr x weight_decay``, the decay per
step, is the same for every parameter at every width and in every parameterization of a family (as
Microsoft's ``mup`` does in ``MuSGD`` / ``MuAdam``). GAMMA's learning-rate rule depends on the update rule
(``gamma_lr``).

Multipliers live in module attributes read by one module-level forward hook, so a deepcopy or a pickled copy
of the model (``Centered``'s frozen baseline, worker processes) carries them and uses its own weights.

The package: ``rules`` (the numbers above), ``layers`` (a model's anatomy), ``apply`` (parameterize, rescale,
mupify) and ``coord`` (the coordinate check and its figure); this module is their face.
"""
from modelscape.mup.apply import mupify, parameterize, rescale, scale_output
from modelscape.mup.coord import coord_check, plot_coord_check
from modelscape.mup.layers import Anatomy, Layer, anatomy
from modelscape.mup.rules import (  # noqa: F401  (the constants stay importable from here, as in 0.3)
    ADAPTIVE_OPTIMIZERS, EMBEDDINGS, MUP_FAMILY, NORMS, ROLES, UPDATE_RULES, WEIGHT_LAYERS, effective_scales,
    gamma_lr, layer_scales, update_rule_of)

__all__ = ["gamma_lr", "rescale", "mupify", "parameterize", "anatomy", "Anatomy", "Layer", "layer_scales",
           "effective_scales", "update_rule_of", "coord_check", "plot_coord_check"]

# Models pickled by 0.3 (checkpoint skeletons) name the hook by this path.
_scale_output = scale_output
