"""Hypothesis strategies over zoo models and the input sizes each accepts, for reuse by tests."""

from hypothesis import settings
from hypothesis import strategies as st

from autocut import zoo

# Small models from both zoos: the "ci" profile draws from these.
CI_MODELS = [
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "convnext_atto",
    "regnetx_002",
    "edgenext_xx_small",
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:squeezenet1_1",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:densenet121",
]


def thorough_models():
    from timm_subset import TIMM_SUBSET

    return sorted(set(CI_MODELS) | set(TIMM_SUBSET.values()) - {"crossvit_tiny_240", "coat_tiny"}
                  | {f"torchvision:{n}" for n in zoo.torchvision_names()})


def model_names():
    """CI_MODELS under the bounded "ci" profile; every timm family and torchvision model under
    a longer one (``--hypothesis-profile=thorough``)."""
    thorough = settings.default.max_examples > 50
    return st.sampled_from(thorough_models() if thorough else CI_MODELS)


# Fixed-size models (position embeddings, window attention) only take their own size.
FIXED_SIZE = ("vit_", "deit_", "swin_", "beit", "cait", "eva", "levit", "volo", "torchvision:vit", "torchvision:swin")


@st.composite
def model_and_size(draw, names=None):
    """A zoo name and a ``(3, H, W)`` it accepts: its own size for fixed-size models, else a
    multiple of 32 between 64 and 160 (non-square allowed)."""
    name = draw(names if names is not None else model_names())
    spec = zoo.resolve(name)
    if any(spec.name.startswith(p) or name.startswith(p) for p in FIXED_SIZE):
        return name, zoo.default_input_size(spec)
    h = draw(st.integers(2, 5)) * 32
    w = draw(st.one_of(st.just(h), st.integers(2, 5).map(lambda k: k * 32)))
    return name, (3, h, w)


def head_options():
    return st.fixed_dictionaries(
        {},
        optional={
            "lin_ftrs": st.lists(st.integers(4, 64), min_size=0, max_size=2),
            "ps": st.floats(0.0, 0.9),
            "concat_pool": st.booleans(),
            "first_bn": st.booleans(),
            "bn_final": st.booleans(),
            "lin_first": st.booleans(),
            "y_range": st.just((-1.0, 1.0)),
        },
    )
