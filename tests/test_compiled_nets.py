"""Compiled nets compile what a request needs, once, and nothing runs quietly as something else.

On a tiny CodeFormer (64x64 faces, 4 channels: the real forward and its branches, a fraction
of the work) with the dynamo backend ``eager`` (no code generation, same graphs and guards):
- the float32 copy (baseline) and the mixed-precision copy (fast, max_speed) of one process
  warm within dynamo's recompile limit at a face batch of 4, every fidelity and batch size;
- compiled nets take fidelity as a float32 tensor on their device (as a host float64 scalar
  the cudagraphs backend skips the graph), and each chunk's output is finished into new
  memory before the next chunk runs (cudagraphs replays into the same memory);
- compiled nets see face batches of 1, 2 and 4 only (a chunk padded up, the padding dropped),
  give each face what the eager net gives it alone, and after warm-up a request with another
  face count or fidelity compiles nothing;
- with ``CODEFORMER_COMPILE_BACKEND`` set, the set-up compiles every graph and no request
  compiles (the full-size seed-0 nets).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
import torch
from helpers import run_python
from torch import nn
from torch._dynamo.utils import counters

from codeformer import pipeline
from codeformer.config import STABILITY_MODES, RequestOptions, Settings
from codeformer.errors import ConfigError
from codeformer.nets import vqgan
from codeformer.nets.codeformer import CodeFormer
from codeformer.pipeline import Restorer, warm_compiled
from codeformer.runtime import Nets, Runtime
from codeformer.stages.face_batch import face_batch_sizes
from codeformer.stages.parse import FaceParser
from codeformer.stages.restore import FaceRestorer

CPU = torch.device("cpu")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
FACE_BATCH = 4  # the CUDA default, where two copies used to pass the limit
TINY_FACE = 64  # the tiny CodeFormer's face side: a 2 x 2 token grid


@pytest.fixture
def tiny_codeformer(monkeypatch: pytest.MonkeyPatch) -> CodeFormer:
    """CodeFormer's forward at a 64th of the pixels and 4 base channels (GroupNorm in groups of 4)."""
    monkeypatch.setattr(vqgan, "GROUP_NORM_GROUPS", 4)
    torch.manual_seed(0)
    net = CodeFormer(
        img_size=TINY_FACE,
        latent_size=4,
        nf=4,
        emb_dim=8,
        dim_embd=16,
        n_head=2,
        n_layers=1,
        codebook_size=32,
        attn_resolutions=(2,),
    )
    return net.eval()


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from nothing and leaves no compiled entries behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def crops(count: int, seed: int = 0) -> torch.Tensor:
    """(count, 64, 64, 3) uint8 BGR crops, a different picture each."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, TINY_FACE, TINY_FACE, 3), generator=generator, dtype=torch.uint8)


@pytest.mark.nets  # dynamo traces CodeFormer eight times (about a minute on two cores)
def test_both_optimized_copies_compile_within_the_recompile_limit_at_face_batch_4(
    tiny_codeformer: CodeFormer,
) -> None:
    runtime = Runtime(Nets(tiny_codeformer, nn.Identity(), nn.Identity()), CPU, mixed_precision="on")
    faces = crops(FACE_BATCH + 1)
    graphs_before = counters["stats"]["unique_graphs"]
    # past the limit dynamo would run the rest eager with one warning: make that an error
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for mixed_precision in (False, True):  # baseline's copy, then fast's and max_speed's
            nets = runtime.nets_for(STABILITY_MODES["optimized"], "eager", mixed_precision)
            restorer = FaceRestorer(nets.codeformer, CPU, batch_size=FACE_BATCH)
            # what requests send: 1, 2 and 5 faces (chunks of 4 and 1), fidelity 0 and others
            for count in (1, 2, FACE_BATCH + 1):
                for fidelity in (0.5, 0.7, 0.0):
                    restorer.restore_tensor(faces[:count], fidelity, mixed_precision)
    # per copy: batches 1, 2 and 4 (5 faces: 4 and 1), each with fusion (any w > 0) and without (w 0)
    assert counters["stats"]["unique_graphs"] - graphs_before == 2 * 6


def replaying_backend(
    graph_inputs: list[list[torch.Tensor]],
) -> Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]:
    """A dynamo backend that behaves as cudagraphs does with memory, without a GPU.

    Every call of a graph writes its outputs into the same tensors (one set per output
    shape), as a CUDA graph replays into its static memory; ``graph_inputs`` receives the
    tensor inputs of each graph as compiled.
    """

    def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graph_inputs.append([value for value in example_inputs if isinstance(value, torch.Tensor)])
        static: dict[tuple[Any, ...], list[torch.Tensor]] = {}

        def replay(*args: Any) -> Any:
            outputs = graph(*args)
            shapes = tuple(tuple(output.shape) for output in outputs)
            memory = static.setdefault(shapes, [torch.empty_like(output) for output in outputs])
            for held, output in zip(memory, outputs, strict=True):
                held.copy_(output)
            return type(outputs)(memory)

        return replay

    return backend


def test_compiled_codeformer_gets_fidelity_as_a_device_tensor_and_keeps_each_chunks_output(
    tiny_codeformer: CodeFormer,
) -> None:
    graph_inputs: list[list[torch.Tensor]] = []
    compiled = torch.compile(tiny_codeformer, backend=replaying_backend(graph_inputs))
    faces = crops(2 * FACE_BATCH)  # two chunks of four: the second replays into the first's memory
    eager = FaceRestorer(tiny_codeformer, CPU, batch_size=FACE_BATCH)
    restorer = FaceRestorer(compiled, CPU, batch_size=FACE_BATCH)
    for fidelity in (0.5, 0.8, 1.0):
        expected = eager.restore_tensor(faces, fidelity, mixed_precision=False)
        torch.testing.assert_close(restorer.restore_tensor(faces, fidelity, False), expected, rtol=0, atol=0)
    [inputs] = graph_inputs  # one graph for every w > 0
    scalars = [value for value in inputs if value.dim() == 0]
    assert [(value.dtype, value.device) for value in scalars] == [(torch.float32, CPU)]


@pytest.mark.nets  # the full-size nets, traced three times and run about ten times
def test_with_a_compile_backend_set_up_no_request_compiles(weights_dir: Path) -> None:
    settings = Settings.from_env(
        "cpu", compile_backend="eager", face_batch=1, mixed_precision="off", max_faces=2
    )
    restorer = Restorer.load(weights_dir, "cpu", settings)
    graphs_before = counters["stats"]["unique_graphs"]
    assert restorer.prepare_optimized() > 0.0
    # mixed precision off: one set of nets for every profile; CodeFormer with and without
    # fusion and ParseNet, at a face batch of 1
    assert counters["stats"]["unique_graphs"] - graphs_before == 3
    photo = cv2.imread(str(PROJECT_ROOT / "tests/golden/01/01.jpg"))
    graphs_before = counters["stats"]["unique_graphs"]
    for profile, fidelity in (("baseline", 0.3), ("fast", 0.0), ("max_speed", 1.0)):
        options = RequestOptions.parse(fidelity, profile, "optimized", "eager")
        [result] = restorer.restore([photo], options)
        assert len(result.faces) == 2
    assert counters["stats"]["unique_graphs"] == graphs_before  # nothing compiled in a request
    with pytest.raises(ConfigError, match="by CODEFORMER_COMPILE_BACKEND; got 'aot_eager'"):
        restorer.restore([photo], RequestOptions.parse(0.5, "baseline", "optimized", "aot_eager"))


class ScalingNet(nn.Module):
    """CodeFormer's call signature on a 1x1 convolution: each face's output depends on that face only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Conv2d(3, 3, 1)

    def forward(
        self, x: torch.Tensor, w: float | torch.Tensor, adain: bool
    ) -> tuple[torch.Tensor, None, None]:
        return torch.tanh(self.mix(x) * (1.0 + w)), None, None


class LabellingNet(nn.Module):
    """ParseNet's call signature: (B, 19, H, W) logits from a 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.classes = nn.Conv2d(3, 19, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return self.classes(x), None, None


def recording_backend(
    batch_sizes: list[int],
) -> Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]]:
    """A dynamo backend that runs the graph as traced and records each graph's face batch size."""

    def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        tensors = [value for value in example_inputs if isinstance(value, torch.Tensor)]
        [faces] = [value for value in tensors if value.shape[-2:] == (TINY_FACE, TINY_FACE)]
        batch_sizes.append(int(faces.shape[0]))
        return graph.forward

    return backend


def test_compiled_nets_see_face_batches_of_1_2_and_4_and_compile_nothing_after_warm_up() -> None:
    """Warmed as set-up warms them, then 1 to 9 faces at fidelities set-up never sent."""
    batch_sizes: list[int] = []
    net, labeller = ScalingNet().eval(), LabellingNet().eval()
    backend = recording_backend(batch_sizes)
    restorer = FaceRestorer(torch.compile(net, backend=backend, dynamic=False), CPU, batch_size=FACE_BATCH)
    parser = FaceParser(torch.compile(labeller, backend=backend, dynamic=False), CPU, batch_size=FACE_BATCH)
    warm_compiled(restorer, parser, mixed_precision=False, backend="eager", face_size=TINY_FACE)
    # CodeFormer with and without fusion at each size, ParseNet at each size
    assert sorted(batch_sizes) == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    eager = FaceRestorer(net, CPU, batch_size=1)  # one face at a time: the official shapes
    for count in range(1, 2 * FACE_BATCH + 2):
        for fidelity in (0.3, 1.0, 0.0):
            faces = crops(count, seed=count)
            expected = eager.restore_tensor(faces, fidelity, mixed_precision=False)
            restored = restorer.restore_tensor(faces, fidelity, mixed_precision=False)
            torch.testing.assert_close(restored, expected, rtol=0, atol=0)
        assert parser.labels_tensor(faces, False).shape == (count, TINY_FACE, TINY_FACE)
    assert len(batch_sizes) == 9, "nothing compiled after the warm-up"


@pytest.mark.nets  # dynamo traces the tiny CodeFormer four times (about half a minute on two cores)
def test_padded_compiled_codeformer_gives_the_faces_what_the_unpadded_chunk_gives(
    tiny_codeformer: CodeFormer,
) -> None:
    """3 faces run as a batch of 4: the same bytes as the eager net's batch of 3.

    (Against each face run alone, a batch of 3 itself differs in the last bits of a few
    values on a CPU: oneDNN's blocking depends on the batch. That is batching, padded or
    not.)
    """
    compiled = torch.compile(tiny_codeformer, backend="eager", dynamic=False)
    restorer = FaceRestorer(compiled, CPU, batch_size=FACE_BATCH)
    for size in face_batch_sizes(FACE_BATCH):  # the warm-up, at one fidelity
        restorer.restore_tensor(crops(size), 0.5, mixed_precision=False)
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    faces = crops(3, seed=1)  # padded to 4
    unpadded = FaceRestorer(tiny_codeformer, CPU, batch_size=FACE_BATCH)
    for fidelity in (0.5, 0.9):
        expected = unpadded.restore_tensor(faces, fidelity, mixed_precision=False)
        torch.testing.assert_close(restorer.restore_tensor(faces, fidelity, False), expected, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up, "3 faces and w 0.9: nothing compiled"


# A fresh process compiles a small convolution with Inductor, the compile cache's file before
# and after, and how many compiled graphs came from Inductor's cache rather than code generation
COMPILE_WITH_CACHE = """
import json, os
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from codeformer.runtime import load_compile_cache, save_compile_cache
cache = Path(os.environ["TEST_COMPILE_CACHE"])
loaded = load_compile_cache(cache)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SiLU())
torch.compile(net, backend="inductor", dynamic=False)(torch.ones(1, 3, 16, 16))
hits = counters["inductor"]["fxgraph_cache_hit"]
written = 0 if loaded else save_compile_cache(cache)
print(json.dumps({"loaded": loaded, "hits": hits, "written": written}))
"""


@pytest.mark.process  # two fresh interpreters, one Inductor compile (C++) between them
def test_a_compile_cache_written_by_one_process_spares_the_next_its_code_generation(tmp_path: Path) -> None:
    """Each process with an empty Inductor cache folder of its own: only the file carries the code."""
    cache = tmp_path / "compile-cache.bin"

    def run(name: str) -> dict[str, int]:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name), "TEST_COMPILE_CACHE": str(cache)}
        completed = run_python(COMPILE_WITH_CACHE, env=env)
        return json.loads(completed.stdout.splitlines()[-1])

    first = run("first")
    assert first["loaded"] == 0 and first["hits"] == 0 and first["written"] >= 1
    assert cache.is_file() and not cache.with_name(cache.name + ".partial").exists()
    second = run("second")
    assert second["loaded"] == first["written"] and second["hits"] >= 1 and second["written"] == 0


@pytest.mark.parametrize("cached", [0, 3], ids=["no-file", "file"])
def test_set_up_loads_the_compile_cache_first_and_writes_it_only_when_it_had_none(
    cached: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prepare_optimized``'s order: load, build every precision's nets, then write if nothing was loaded."""
    events: list[str] = []
    cache = tmp_path / "compile-cache.bin"
    monkeypatch.setattr(pipeline, "load_compile_cache", lambda path: events.append(f"load {path}") or cached)
    monkeypatch.setattr(pipeline, "save_compile_cache", lambda path: events.append(f"save {path}") or 2)
    monkeypatch.setattr(Runtime, "nets_for", lambda self, *args: events.append("build") or self.safe_nets)
    settings = Settings(compile_backend="none", compile_cache=cache, mixed_precision="off")
    restorer = Restorer(Nets(*(nn.Identity() for _ in range(3))), torch.device("cpu"), settings)
    try:
        restorer.prepare_optimized()
    finally:
        restorer.scheduler.stop()
    assert events[0] == f"load {cache}" and "build" in events
    assert events[-1] == (f"save {cache}" if not cached else "build")
