"""Dynamic expert role assignment (FLUX technique 3).

Eq. 3 utilities (:mod:`.utility`), Eq. 4 top-B selection with the exploitation/exploration split
and epsilon schedule (:mod:`.assignment`), SPSA gradient estimates for exploration experts
(:mod:`.zeroth_order`).
"""
from flux.roles.assignment import (
    ROLE_EXPLOIT,
    ROLE_EXPLORE,
    ROLE_NON_TUNING,
    SCHEDULES,
    EpsilonSchedule,
    RoleAssignment,
    assign_roles,
    select_top_b,
    split_budget,
)
from flux.roles.utility import (
    activation_utilities,
    expert_utility,
    utility_from_sums,
    per_sample_grad_sq_norms,
    utilities_from_grad_norms,
)
from flux.roles.zeroth_order import DEFAULT_NUM_PERTURBATIONS, DEFAULT_SIGMA, cosine_distance, spsa_gradient

__all__ = [
    "DEFAULT_NUM_PERTURBATIONS",
    "DEFAULT_SIGMA",
    "EpsilonSchedule",
    "ROLE_EXPLOIT",
    "ROLE_EXPLORE",
    "ROLE_NON_TUNING",
    "RoleAssignment",
    "SCHEDULES",
    "activation_utilities",
    "assign_roles",
    "cosine_distance",
    "expert_utility",
    "utility_from_sums",
    "per_sample_grad_sq_norms",
    "select_top_b",
    "spsa_gradient",
    "split_budget",
    "utilities_from_grad_norms",
]
