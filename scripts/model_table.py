"""Print and write docs/models.md: parameters, MACs and SE overhead of every registered model.

    python scripts/model_table.py              # writes docs/models.md
    python scripts/model_table.py --no-write   # prints only

Everything is computed on the meta device (no weights allocated, seconds for all models):
parameters by counting, MACs with torch.utils.flop_counter at the model's native input size
(convolutions and FC layers; a multiply-add is one MAC), and the SE overhead against the plain
twin. The SE block also pools and scales every element of its input; those element-wise
operations are not multiply-adds, so they are reported in their own column (one op per element
each) to compare with the paper's "+~10% parameters, <1% compute" claim (Sec. 4, Table 2).
"""

import argparse
import platform
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from setrain.models import SEBlock, create_model, is_se_model, list_models, plain_twin

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def measure(name: str, **options) -> dict:
    """Parameters, MACs and SE element-wise ops of one model for one image at its native size."""
    with torch.device("meta"):
        model = create_model(name, **options).eval()
        size = model.native_input_size
        elementwise = []
        for module in model.modules():
            if isinstance(module, SEBlock):  # squeeze: one add per element; scale: one multiply
                module.register_forward_hook(lambda _, inputs, __: elementwise.append(2 * inputs[0].numel()))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.empty(1, 3, size, size))
    return dict(
        params=sum(p.numel() for p in model.parameters()),
        macs=counter.get_total_flops() // 2,
        se_elementwise=sum(elementwise),
        size=size,
    )


def percent(value: float, base: float) -> str:
    return f"+{100 * value / base:.2f}%"


def zoo_table() -> list[str]:
    rows = [
        "| model | plain twin | input | parameters | GMACs | SE params | SE MACs | SE MACs + element-wise ops |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in list_models():
        if not is_se_model(name):
            continue
        se, plain = measure(name), measure(plain_twin(name))
        rows.append(
            f"| `{name}` | `{plain_twin(name)}` | {se['size']} px | {se['params']:,} | "
            f"{se['macs'] / 1e9:.3f} | {percent(se['params'] - plain['params'], plain['params'])} | "
            f"{percent(se['macs'] - plain['macs'], plain['macs'])} | "
            f"{percent(se['macs'] - plain['macs'] + se['se_elementwise'], plain['macs'])} |"
        )
    rows += ["", "| plain model | input | parameters | GMACs |", "|---|---|---:|---:|"]
    for name in list_models():
        if not is_se_model(name):
            plain = measure(name)
            rows.append(f"| `{name}` | {plain['size']} px | {plain['params']:,} | {plain['macs'] / 1e9:.3f} |")
    return rows


def reduction_table() -> list[str]:
    """SE-ResNet-50 against r, the computed counterpart of the paper's ablation (TPAMI Sec. 6.1)."""
    paper_millions = {2: 45.7, 4: 35.7, 8: 30.7, 16: 28.1, 32: 26.6}
    base = measure("resnet50")
    rows = [
        "| r | parameters | paper (Sec. 6.1) | SE params | GMACs |",
        "|---:|---:|---:|---:|---:|",
        f"| (ResNet-50) | {base['params']:,} | 25.6M | | {base['macs'] / 1e9:.3f} |",
    ]
    for reduction, millions in paper_millions.items():
        se = measure("se_resnet50", reduction=reduction)
        rows.append(
            f"| {reduction} | {se['params']:,} | {millions}M | "
            f"{percent(se['params'] - base['params'], base['params'])} | {se['macs'] / 1e9:.3f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args()
    lines = [
        "# Model zoo",
        "",
        "Written by `python scripts/model_table.py` (computed, not typed; torch "
        f"{torch.__version__}, {platform.python_implementation()} {platform.python_version()}).",
        "Parameters at 1000 classes (10 for the 32 px CIFAR models) and r=16; MACs for one image at",
        "the native input size, counted by `torch.utils.flop_counter` over convolutions and FC",
        "layers. SE overhead is relative to the plain twin; the last column adds the SE block's",
        "pooling and scaling (one operation per element each), which are not multiply-adds.",
        "",
        "## SE models and their plain twins",
        "",
        *zoo_table(),
        "",
        "## SE-ResNet-50 and the reduction ratio r",
        "",
        *reduction_table(),
        "",
        "The paper's ResNet-50 needs 3.86 GFLOPs (multiply-adds) because its Caffe models stride",
        "the first 1x1 convolution; setrain, like torchvision, strides the 3x3, which costs more",
        "MACs in the first block of each stage and is more accurate. Parameter counts equal",
        "torchvision's and the released SENets' to the unit (tests/test_models.py).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        DOCS.parent.mkdir(exist_ok=True)
        DOCS.write_text(text)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
