"""Ready batch functions: ``base_bfn(bsz, gen, X, y, **kwargs) -> batch_fn(step) -> (X, y)``."""
from modelscape.data.digits import digits_bfn, digits_pools, digits_test_set
from modelscape.data.language import markov_bfn, markov_chain, markov_entropy_rate
from modelscape.data.synthetic import fixed_bfn, powerlaw_bfn, powerlaw_target

__all__ = ["powerlaw_bfn", "powerlaw_target", "fixed_bfn", "digits_bfn", "digits_test_set", "digits_pools",
           "markov_bfn", "markov_chain", "markov_entropy_rate"]
