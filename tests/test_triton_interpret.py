"""loraforge's Triton kernels on the CPU, through Triton's interpreter (``TRITON_INTERPRET=1``).

On a GPU the kernels are checked by ``tests/test_gpu.py``; here the same kernel code runs on CPU
tensors in CI (where Triton is installed: Linux x86-64), so a change to an index, a layout or
the random stream is caught without a GPU. The checks run in one child process
(``tests/_triton_child.py``): the interpreter must be switched on before Triton is imported.

* the dropout kernel's mask is the documented function of the seed (a reference Philox-4x32-10
  written in numpy), the bits give it back, the dropped output is the input times the mask, and
  each of a draw's eight positions keeps 1 - p;
* SwiGLU and the RMSNorm kernels against torch in float32; the backward's fused SwiGLU-and-mask
  kernel against SwiGLU followed by the mask kernel, exactly; the rank-r product kernel of
  :mod:`loraforge.fast.lowrank` against torch's product, and the lean functions' backward pass
  through it against the formulas;
* the NF4 dequantization kernel bit for bit against bitsandbytes, except in a 16-bit type whose
  conversion this interpreter truncates where a GPU rounds to nearest (CI's for bfloat16, the GPU
  image's for float16 too: probed first): there within one unit in the last place
  (``tests/test_qlora.py`` checks every bit on a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (Linux x86-64 only)")
pytest.importorskip("bitsandbytes", reason="the NF4 checks compare with bitsandbytes")

CHILD = Path(__file__).with_name("_triton_child.py")


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(CHILD)], capture_output=True, text=True, env=env, timeout=600
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"the child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize(
    "check",
    [
        "dropout_p0.1",
        "dropout_p0.5_64bit_seed_ragged",
        "swiglu_and_rms",
        "dropout_seed_from_a_tensor",
        "swiglu_keep",
        "lowrank",
        "lora_backward_through_the_kernels",
        *(f"nf4_{q}_{d}" for q in ("nested", "flat") for d in ("float16", "float32", "bfloat16")),
    ],
)
def test_kernel_under_the_interpreter(results, check):
    assert check in results, sorted(results)
    assert results[check] == "ok", results[check]
