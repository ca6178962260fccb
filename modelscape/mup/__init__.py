"""Parameterizations (sp, ntp, mup, mfp, ntp-lr, mup-lr), base widths (muTransfer), tunable multipliers, GAMMA
richness, depth rules (residual branches) and the coordinate checks.

**Absolute rules** (no base width: the default, ``BASE_WIDTH`` unset). The semantics for weight layers are
those of D. Karkada's ``mupify`` (not on the package registry, so written here from its math). A weight layer
computes ``mult * (W x + b)``; ``parameterize`` sets, per layer, the output multiplier ``mult``, the init std
of ``W`` and the learning-rate factor of its optimizer parameter group. Weight layers are ``nn.Linear``,
``nn.Conv1d/2d/3d`` and ``nn.Embedding``. The read-in and the read-out are the modules the model names
(``input_layer`` / ``output_layer`` attributes, or ``parameterize``'s arguments), checked by a forward pass:
they must be the first and the last weight layer the data goes through. The other Linear/Conv layers are
hidden (a width -> fixed bottleneck in the middle is read-out-like, when the base shapes say which
dimensions grow). The model width ``n`` is its ``width`` attribute (else the largest fan-out of every layer but
the read-out), and a layer's fan-in is ``prod(weight.shape[1:])``. With ``a = sqrt(n)`` for mup, mfp, mup-lr
and ``a = 1`` for ntp, ntp-lr, and ``q = a**2 / fan_in`` (read-in, hidden) or ``q = 1 / fan_in`` (read-out):

==============  ============  ==============  ==============
param           multiplier    init std        SGD lr factor
==============  ============  ==============  ==============
mup-lr, ntp-lr  1             sqrt(q) / a     q
mup             sqrt(q)       1 / a           1
mfp, ntp        sqrt(q) / a   1               a**2
==============  ============  ==============  ==============

Within a family the three choices are the same network: the effective weight ``mult * W`` starts with std
``sqrt(q) / a`` and SGD moves it with learning rate ``lr * q`` (``lr_factor * mult**2 = q``). ntp and mup
differ only at the read-out, whose effective init is ``1/sqrt(n)`` times smaller under mup. Adam-like and
sign-based optimizers get their own factors (``effective_scales``). Vector-like parameters (biases, norm gains
and biases) are weights on a constant input coordinate (Tensor Programs V, Table 3): under Adam read-ins of
fan-in 1, so their effective rate is independent of width and of the data's dimension; under SGD one more input
coordinate of the read-in, ``a**2 / d_in`` (``vector_scale``). Embeddings are read-ins of fan-in 1. Every
``nn.ReLU`` gets the multiplier sqrt(2) (``relu_gain``).

**Relative rules** (a base width: ``BASE_WIDTH`` or ``parameterize(base=...)``), Microsoft's ``mup``: at the
base width the model is sp's to the bit (its own init, no multipliers, the base learning rate), and from there
each parameter scales with the growth of its fan-in ``m_in`` and fan-out ``m_out`` (``relative_scales``): the
read-out's effective init by ``1/sqrt(m_in)`` and learning rate by ``1/m_in``, hidden Adam rates by
``1/m_in``, read-in and vector-like SGD rates by ``m_out``. The three rows of a family differ only in where
the multiplier sits (``relative_mult``): mup at the read-out only (Microsoft's ``MuReadout``), mfp / ntp the
init's change, -lr none. Tuned hyperparameters then carry over from the base width: muTransfer.

Attention modules with ``d_head`` and ``attn_scale`` (``modelscape.models.SelfAttention``) get the
parameterization's logit scale (``attention_scale``: 1/d_head under the mup family, sqrt(base d_head)/d_head
with a base width); their ``attn_mult`` is the user's and never touched. Weight decay is divided by each
group's learning-rate factor, so ``lr x weight_decay`` is the same for every parameter at every width (as
``MuSGD`` / ``MuAdam``). GAMMA's learning-rate rule depends on the update rule (``gamma_lr``). Multipliers
live in module attributes read by one module-level forward hook, so a deepcopy or a pickled copy of the model
carries them and uses its own weights.

The package: ``rules`` (the numbers), ``shapes`` (base shapes), ``layers`` (a model's anatomy), ``assign`` (the
numbers on an anatomy, tunable multipliers), ``apply`` (parameterize, rescale, mupify), ``optim`` (Lion),
``depth`` (residual-branch rules, DEPTH_ALPHA) and ``coord`` (the coordinate checks and their figure); this
module is their face. The README derives every rule.
"""
from modelscape.mup.apply import mupify, parameterize, rescale, scale_output
from modelscape.mup.assign import LR_GROUPS, Assignment, Knobs, Rule, assign
from modelscape.mup.coord import coord_check, coord_check_depth, plot_coord_check
from modelscape.mup.depth import apply_depth, depth_factors, residual_blocks
from modelscape.mup.layers import Anatomy, Layer, anatomy
from modelscape.mup.optim import Lion
from modelscape.mup.rules import (  # noqa: F401  (the constants stay importable from here, as in 0.3)
    ADAPTIVE_OPTIMIZERS, EMBEDDINGS, MUP_FAMILY, NORMS, ROLES, UPDATE_RULES, attention_scale, effective_scales,
    gamma_lr, layer_scales, relative_mult, relative_scales, update_rule_of, vector_scale)
from modelscape.mup.shapes import Shapes, base_shapes, build_shapes

__all__ = ["gamma_lr", "rescale", "mupify", "parameterize", "anatomy", "Anatomy", "Layer", "layer_scales",
           "effective_scales", "vector_scale", "relative_scales", "relative_mult", "attention_scale",
           "update_rule_of", "coord_check", "coord_check_depth", "plot_coord_check", "base_shapes", "build_shapes",
           "Shapes", "Knobs",
           "assign", "Assignment", "Rule", "LR_GROUPS", "Lion", "residual_blocks", "depth_factors", "apply_depth"]

# Models pickled by 0.3 (checkpoint skeletons) name the hook by this path.
_scale_output = scale_output
