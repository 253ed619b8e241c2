"""Device placement on CUDA, proved on a CPU with fake tensors (``tests/fake_cuda.py``).

Every torch path a CUDA request takes runs here on fake CUDA tensors: the three nets as the
runtime hands them to each profile and stability mode (float32; fp16 autocast with the
optimized copies' fp16 convolution weights; channels_last), and each stage's device part
from its one upload to its one download. Nothing is computed, so each case takes about a
second; what is checked is where tensors live, their dtypes, and what crosses the bus.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import cv2
import numpy as np
import pytest
import torch
from fake_cuda import CUDA, DeviceLog, cuda_reported_available, fake_cuda_events, fake_cuda_mode, to_fake_cuda
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from codeformer import pipeline
from codeformer.config import FACE_SIZE, PROFILES, STABILITY_MODES
from codeformer.nets.codeformer import CodeFormer
from codeformer.nets.parsenet import PARSE_CLASSES, ParseNet
from codeformer.nets.retinaface import RetinaFace
from codeformer.runtime import Nets, Runtime, arrived, downloads, staged, upload
from codeformer.scheduler import DeviceScheduler
from codeformer.stages import detect, device_paste, face_batch
from codeformer.stages.detect import FaceDetector, prior_boxes
from codeformer.stages.device_warp import warp_crops_tensor
from codeformer.stages.parse import FaceMasks, FaceParser
from codeformer.stages.restore import FaceRestorer, RestoredFaces

pytestmark = [
    # torchvision's NMS shape rule and deepcopy of fake parameters warn about torch internals
    pytest.mark.filterwarnings("ignore:`create_unbacked_symint` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor:UserWarning"),
]

T = TypeVar("T")
CPU = torch.device("cpu")
FlagReads = list[tuple[torch.device, torch.dtype, tuple[int, ...]]]  # (device, dtype, shape) of each read
FACE_BATCH = 4  # Settings.face_batch's default: 5 faces make two chunks
FACES = 5
SMALL_COPY_BYTES = 4096  # rows, sums, flags, areas, transforms: anything under this is not pixels


def device_variants(use_parse_only: bool = False) -> list[object]:
    """(mixed_precision, stability) of every profile x stability mode a request can ask for on CUDA.

    Profiles that share a precision (fast, max_speed) run the same nets: one case, named
    after all of them. On CUDA mixed precision always pays (``mixed_precision_pays``).
    """
    profiles: dict[bool, list[str]] = {}
    for name, profile in PROFILES.items():
        if profile.use_parse or not use_parse_only:
            profiles.setdefault(profile.mixed_precision, []).append(name)
    return [
        pytest.param(mixed_precision, stability, id=f"{'+'.join(names)}-{stability}")
        for mixed_precision, names in profiles.items()
        for stability in STABILITY_MODES
    ]


@pytest.fixture(scope="module")
def mode() -> FakeTensorMode:
    return fake_cuda_mode()


@pytest.fixture(scope="module")
def runtime(mode: FakeTensorMode) -> Iterator[Runtime]:
    """A runtime on fake CUDA nets with the official configurations and random initial weights."""
    nets = Nets(*(to_fake_cuda(net.eval(), mode) for net in (CodeFormer(), RetinaFace(), ParseNet())))
    # Runtime sets CUDA's numerics flags for safe mode: restored when this module's tests end
    flags = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32")]
    flags.append((torch.backends.cuda.matmul, "allow_tf32"))
    saved = [(module, flag, getattr(module, flag)) for module, flag in flags]
    runtime = Runtime(nets, CUDA)
    assert runtime.mixed_precision, "on CUDA the fast profiles always get fp16"
    yield runtime
    for module, flag, value in saved:
        setattr(module, flag, value)


def nets_for(runtime: Runtime, mode: FakeTensorMode, mixed_precision: bool, stability: str) -> Nets:
    """The nets the pipeline runs a request with these settings on."""
    with mode:  # the optimized copies are made from the fake nets
        return runtime.nets_for(STABILITY_MODES[stability], "none", mixed_precision)


def host_tensor(mode: FakeTensorMode, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A fake host tensor standing for ``torch.from_numpy`` of a decoded image or crop batch."""
    with mode:
        return torch.empty(shape, dtype=dtype)


def run_logged(mode: FakeTensorMode, function: Callable[..., T], *args: object) -> tuple[T, DeviceLog]:
    """``function(*args)`` on fake tensors, with autocast("cuda") able to engage; its result and log."""
    with mode, cuda_reported_available(), fake_cuda_events(), DeviceLog() as log:
        result = function(*args)
    return result, log


@pytest.fixture
def finiteness_reads(monkeypatch: pytest.MonkeyPatch) -> FlagReads:
    """(device, dtype, shape) of each set of finiteness flags the host reads; every face is finite.

    A fake tensor holds no values, so the flags cannot be read: the stand-in records what the
    host was given and reports no non-finite chunk.
    """
    reads: FlagReads = []

    def non_finite_faces(finite: torch.Tensor) -> list[int]:
        reads.append((finite.device, finite.dtype, tuple(finite.shape)))
        return []

    monkeypatch.setattr(face_batch, "non_finite_faces", non_finite_faces)
    return reads


def assert_one_copy_each_way(log: DeviceLog, queued: bool = True) -> None:
    """One copy up, one down (besides a few bytes of flags), neither blocking the thread;
    ``queued=False``: the download may wait (after a wait for the device anyway)."""
    assert len(log.uploads) == 1, "one host->device copy: the stage's input"
    assert log.pinned_uploads == log.uploads, "from pinned memory, without blocking the host"
    assert len([size for size in log.download_bytes if size is None or size >= SMALL_COPY_BYTES]) == 1, (
        "one device->host copy: the stage's result"
    )
    if queued:
        assert log.pinned_downloads == log.downloads, "into pinned memory, without blocking the host"
    assert log.host_ops == [], "no tensor made or computed on the host inside the CUDA path"
    assert log.dtype_clashes == [], "a convolution CUDA would refuse"
    assert log.inexact_divisions == [], "use divide_exactly: CUDA would multiply by the reciprocal"


@pytest.mark.parametrize(("mixed_precision", "stability"), device_variants())
def test_runtime_hands_each_request_cuda_nets_in_its_precision_and_memory_format(
    runtime: Runtime, mode: FakeTensorMode, mixed_precision: bool, stability: str
) -> None:
    """Safe: the nets as loaded; optimized: channels_last, fp16 convolutions when mixed (detector fp32)."""
    nets = nets_for(runtime, mode, mixed_precision, stability)
    optimized = STABILITY_MODES[stability].compiled
    memory_format = torch.channels_last if optimized else torch.contiguous_format
    for name, net in vars(nets).items():
        reduced = optimized and mixed_precision and name != "retinaface"
        weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert {t.device for t in [*net.parameters(), *net.buffers()]} == {CUDA}, name
        assert {w.dtype for w in weights} == {torch.float16 if reduced else torch.float32}, name
        assert all(w.is_contiguous(memory_format=memory_format) for w in weights), name


@pytest.mark.parametrize(("mixed_precision", "stability"), device_variants())
def test_nets_run_on_cuda_in_every_profile(
    runtime: Runtime, mode: FakeTensorMode, mixed_precision: bool, stability: str
) -> None:
    """Each net's forward as its stage calls it: outputs on CUDA, in the autocast dtype when mixed."""
    nets = nets_for(runtime, mode, mixed_precision, stability)
    autocast_dtype = torch.float16 if mixed_precision else torch.float32
    with mode:
        faces = torch.empty((2, 3, FACE_SIZE, FACE_SIZE), device=CUDA)  # normalised crops
        detector_input = torch.empty((1, 3, 640, 480), device=CUDA)

    def forwards() -> dict[str, tuple[torch.Tensor, ...]]:
        with torch.inference_mode():
            detector_out = nets.retinaface(detector_input)
            with torch.autocast("cuda", dtype=torch.float16, enabled=mixed_precision):
                return {
                    "codeformer": nets.codeformer(faces, w=0.5, adain=True),
                    "parsenet": nets.parsenet(faces),
                    "retinaface": detector_out,
                }

    outputs, log = run_logged(mode, forwards)
    assert (log.uploads, log.downloads, log.host_ops) == ([], [], [])
    assert (log.dtype_clashes, log.inexact_divisions) == ([], [])
    assert set(log.convolution_dtypes) == ({torch.float32, autocast_dtype})
    restored, logits, quantised = outputs["codeformer"]
    assert (restored.device, restored.dtype, restored.shape) == (
        CUDA,
        autocast_dtype,
        (2, 3, FACE_SIZE, FACE_SIZE),
    )
    assert (logits.device, logits.dtype) == (CUDA, torch.float32)  # the transformer's code logits
    assert quantised.device == CUDA
    parse_logits = outputs["parsenet"][0]
    assert (parse_logits.device, parse_logits.dtype, parse_logits.shape) == (
        CUDA,
        autocast_dtype,
        (2, PARSE_CLASSES, FACE_SIZE, FACE_SIZE),
    )
    anchors = prior_boxes(640, 480).shape[0]
    loc, conf, landms = outputs["retinaface"]  # the detector always runs in float32
    assert [(t.device, t.dtype, tuple(t.shape)) for t in (loc, conf, landms)] == [
        (CUDA, torch.float32, (1, anchors, size)) for size in (4, 2, 10)
    ]


@pytest.mark.parametrize("stability", list(STABILITY_MODES))
@pytest.mark.parametrize(("height", "width"), [(640, 853)])
def test_detector_uploads_the_image_and_downloads_the_rows_only(
    runtime: Runtime,
    mode: FakeTensorMode,
    stability: str,
    height: int,
    width: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pre-processing, RetinaFace, priors, decoding, NMS, the scale and eye-distance filters all on CUDA.

    Every anchor a candidate: a fake tensor has no value for the host to read whether the
    candidates ran out (``test_detect.py`` checks that read and its fallback on real tensors).
    """
    monkeypatch.setattr(detect, "MAX_CANDIDATES", height * width)
    nets = nets_for(runtime, mode, False, stability)
    with mode:
        detector = FaceDetector(nets.retinaface, CUDA)
    pixels = host_tensor(mode, (height, width, 3), torch.uint8)
    for _ in range(2):  # the second call finds its priors in the cache
        rows, log = run_logged(mode, detector.detect_rows, pixels, 640 / min(height, width))
        assert_one_copy_each_way(log, queued=False)  # the rows, once NMS has waited for the device
        assert (rows.device.type, rows.dtype, rows.shape[1]) == ("cpu", torch.float32, 16)
        assert set(log.convolution_dtypes) == {torch.float32}
        # NMS is the one wait for the device (its greedy pass runs on the host); the
        # candidates and the filters have sizes the data does not decide
        assert log.waits == ["torchvision.nms"]
    assert detector.priors(height, width).device == CUDA


def test_the_exact_detection_steps_wait_for_the_device_more_often(
    runtime: Runtime, mode: FakeTensorMode
) -> None:
    """What the CPU path would cost on CUDA, and what the test above counts: nonzero, NMS, and
    (before the filters became a column) a boolean index."""
    with mode:
        detector = FaceDetector(nets_for(runtime, mode, False, "safe").retinaface, CUDA)
        net_input = torch.empty((1, 3, 640, 853), device=CUDA)
    heads, _ = run_logged(mode, detector.net, net_input)
    _, log = run_logged(mode, detector.rows_exact, heads, (640, 853), 1.0)
    assert "aten.nonzero" in log.waits and "torchvision.nms" in log.waits


@pytest.mark.parametrize(("mixed_precision", "stability"), device_variants())
def test_restorer_uploads_the_crops_and_downloads_the_faces_only(
    runtime: Runtime,
    mode: FakeTensorMode,
    mixed_precision: bool,
    stability: str,
    finiteness_reads: FlagReads,
) -> None:
    """uint8 crops -> normalised RGB -> CodeFormer in two chunks -> uint8 BGR faces, on CUDA.

    In fp16 each face's output is checked for non-finite values on the device, and the flags
    come to the host with the faces, both copies queued behind one event: nothing waits for
    the device between the upload and the wait for that event.
    """
    nets = nets_for(runtime, mode, mixed_precision, stability)
    with mode:
        restorer = FaceRestorer(nets.codeformer, CUDA, batch_size=FACE_BATCH)
    crops = host_tensor(mode, (FACES, FACE_SIZE, FACE_SIZE, 3), torch.uint8)
    faces, log = run_logged(mode, restorer.restore_tensor, crops, 0.5, mixed_precision)
    assert_one_copy_each_way(log)
    assert (faces.device.type, faces.dtype, faces.shape) == ("cpu", torch.uint8, crops.shape)
    assert set(log.convolution_dtypes) == {torch.float16 if mixed_precision else torch.float32}
    assert log.waits == []
    assert finiteness_reads == ([(CPU, torch.bool, (FACES,))] if mixed_precision else [])
    assert len(log.downloads) == 1 + int(mixed_precision)


@pytest.mark.parametrize("callers", [1, 2])
def test_the_host_path_stages_faces_on_request_threads_and_the_device_thread_only_queues_copies(
    mode: FakeTensorMode, callers: int
) -> None:
    """The host pixel path's batches on CUDA: no host copy of a face on the device thread.

    Each request joins its images' crops into pinned memory on its own thread
    (``runtime.staged``); the device thread uploads each request's part without blocking and
    joins the parts on the device, for one forward when requests meet.
    """
    log = DeviceLog()
    part_sizes = [(2, 1), (3,)][:callers]  # faces per image, per request
    with mode, log:
        payloads = [
            staged([np.zeros((faces, FACE_SIZE, FACE_SIZE, 3), np.uint8) for faces in sizes], CUDA)
            for sizes in part_sizes
        ]
    staging_by_requests, host_ops_by_requests = list(log.staging), list(log.host_ops)
    assert staging_by_requests.count("aten.empty") == callers, "one pinned buffer per request"
    assert [len(payload) for payload in payloads] == [sum(sizes) for sizes in part_sizes]

    def serve_logged(serve: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            with mode, log:
                serve()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    seen: list[tuple[str, tuple[int, ...]]] = []

    def forward(batch: torch.Tensor) -> torch.Tensor:
        seen.append((batch.device.type, tuple(batch.shape)))
        return batch

    scheduler = DeviceScheduler(batch_size=8, batch_wait_s=60.0, start_thread=serve_logged, device=CUDA)
    inside = threading.Barrier(callers)

    def request(payload: torch.Tensor) -> None:
        with scheduler.caller():
            inside.wait()  # both in progress before either submits: their faces meet
            scheduler.batched("restore", forward, payload)

    threads = [threading.Thread(target=request, args=(payload,)) for payload in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60.0)
        assert not thread.is_alive(), "a request hung"
    scheduler.stop()
    assert seen == [("cuda", (sum(len(payload) for payload in payloads), 512, 512, 3))]
    assert log.staging == staging_by_requests, "no staging copy on the device thread"
    assert log.uploads == log.pinned_uploads and len(log.uploads) == callers
    assert log.host_ops == host_ops_by_requests and log.downloads == []


@pytest.mark.parametrize(("mixed_precision", "stability"), device_variants(use_parse_only=True))
@pytest.mark.parametrize("face_dtype", [torch.uint8, torch.float64])  # restored faces; gray inputs' float64
def test_parser_uploads_the_faces_and_downloads_the_labels_only(
    runtime: Runtime,
    mode: FakeTensorMode,
    mixed_precision: bool,
    stability: str,
    face_dtype: torch.dtype,
    finiteness_reads: FlagReads,
) -> None:
    """Normalisation, ParseNet in two chunks, argmax and the face-class lookup, on CUDA.

    In fp16 each face's logits are checked for non-finite values on the device; the flags
    come back with the labels, and nothing waits for the device in between.
    """
    nets = nets_for(runtime, mode, mixed_precision, stability)
    with mode:
        parser = FaceParser(nets.parsenet, CUDA, batch_size=FACE_BATCH)
    faces = host_tensor(mode, (FACES, FACE_SIZE, FACE_SIZE, 3), face_dtype)
    labels, log = run_logged(mode, parser.labels_tensor, faces, mixed_precision)
    assert_one_copy_each_way(log)
    assert (labels.device.type, labels.dtype, labels.shape) == ("cpu", torch.bool, faces.shape[:3])
    assert set(log.convolution_dtypes) == {torch.float16 if mixed_precision else torch.float32}
    assert log.waits == []
    assert finiteness_reads == ([(CPU, torch.bool, (FACES,))] if mixed_precision else [])


@pytest.mark.parametrize(("mixed_precision", "stability"), device_variants(use_parse_only=True))
@pytest.mark.parametrize("face_count", [1, FACES])
def test_parser_device_masks_upload_the_faces_and_download_the_masks_only(
    runtime: Runtime,
    mode: FakeTensorMode,
    mixed_precision: bool,
    stability: str,
    face_count: int,
    finiteness_reads: FlagReads,
) -> None:
    """``masks_tensor``: ParseNet, the labels and both blurs on CUDA; the labels never cross the bus.

    The host path downloads the (F, 512, 512) labels and blurs them on the host; here the one
    device->host copy is the float64 masks, whatever the face count.
    """
    nets = nets_for(runtime, mode, mixed_precision, stability)
    with mode:
        parser = FaceParser(nets.parsenet, CUDA, batch_size=FACE_BATCH)
    faces = host_tensor(mode, (face_count, FACE_SIZE, FACE_SIZE, 3), torch.uint8)
    masks, log = run_logged(mode, parser.masks_tensor, faces, mixed_precision)
    assert_one_copy_each_way(log)
    assert log.waits == []
    assert (masks.device.type, masks.dtype, masks.shape) == ("cpu", torch.float64, faces.shape[:3])
    assert finiteness_reads == ([(CPU, torch.bool, (face_count,))] if mixed_precision else [])


def test_device_log_sees_what_the_stage_tests_forbid(mode: FakeTensorMode) -> None:
    """The instrument itself: stray copies, host-made tensors and dtype clashes are all recorded."""
    with mode:
        image = torch.empty((1, 3, 8, 8), device=CUDA)
        weight = torch.empty((4, 3, 3, 3), device=CUDA)
    with mode, DeviceLog() as log:
        shifted = image - torch.tensor([1.0, 2.0, 3.0], device=CUDA).view(1, 3, 1, 1)  # built on the host
        torch.nn.functional.conv2d(shifted, weight.half())
        shifted.cpu()
        (shifted / 2.0, shifted / 255.0)  # 1 / 2 is exact, 1 / 255 is not
    assert log.uploads == ["aten._to_copy"] and log.downloads == ["aten._to_copy"]
    assert log.pinned_uploads == [], "from pageable memory: the host waits for the copy"
    pageable = host_tensor(mode, (2, 3), torch.float32)
    with mode, DeviceLog() as pinned_log:
        upload(pageable, CUDA)
    assert pinned_log.pinned_uploads == pinned_log.uploads == ["aten._to_copy"]
    assert pinned_log.host_ops == [] and pinned_log.staging == ["aten.empty", "aten.copy_"]
    assert log.host_ops and log.dtype_clashes == ["input torch.float32, weight torch.float16"]
    assert log.inexact_divisions == ["aten.div by 255.0"]
    with mode, pytest.raises(FakeTensorDeviceMismatchError):
        image + torch.ones(3, 8, 8)  # a CPU tensor meeting a CUDA one


def test_autocast_on_fake_cuda_needs_cuda_reported_available(mode: FakeTensorMode) -> None:
    """Why the stage tests patch ``torch.cuda.is_available``: otherwise autocast("cuda") is off."""
    with mode:
        image, weight = torch.empty((1, 3, 8, 8), device=CUDA), torch.empty((4, 3, 3, 3), device=CUDA)
    with pytest.warns(UserWarning, match="CUDA is not available"):
        disabled = torch.autocast("cuda", dtype=torch.float16)
    with mode, disabled:
        assert torch.nn.functional.conv2d(image, weight).dtype == torch.float32
    with cuda_reported_available():
        enabled = torch.autocast("cuda", dtype=torch.float16)
    with mode, enabled:
        assert torch.nn.functional.conv2d(image, weight).dtype == torch.float16


@pytest.mark.parametrize("profile", ["fast", "max_speed"])
@pytest.mark.parametrize("face_count", [1, FACES])
def test_the_device_pixel_path_copies_an_image_up_once_and_down_once(
    runtime: Runtime,
    mode: FakeTensorMode,
    profile: str,
    face_count: int,
    finiteness_reads: FlagReads,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request's image on the device pixel path, from its upload to its finished pixels, on CUDA.

    The pipeline's device calls in order (``locate_on_device``, the crops, CodeFormer's and in
    fast the parse masks' launch, kept on the device, ``plan_paste_on_device``,
    ``paste_on_device``), each logged on its own, with the request's steps between them: the
    arrivals, and standing in, the landmark fit's transforms and the gray test's and the
    areas' reads (a fake tensor holds no values). A small photo, enlarged to work on and
    shrunk back at the end: every moved stage runs. Whatever the face count, one pixel-sized
    copy each way, and no device call waits for the device but the detector's (NMS).
    """
    monkeypatch.setattr(detect, "MAX_CANDIDATES", 1 << 30)  # see the detector's test above
    areas_read: list[tuple[int, ...]] = []

    def face_areas(areas: torch.Tensor) -> list[float]:
        areas_read.append((areas.device.type, *areas.shape))
        return [60_000.0] * len(areas)  # a face's eroded area, about 245 px square: w_edge 12

    monkeypatch.setattr(device_paste, "face_areas", face_areas)
    nets = nets_for(runtime, mode, True, "safe")
    with mode:
        detector = FaceDetector(nets.retinaface, CUDA)
        restorer = FaceRestorer(nets.codeformer, CUDA, batch_size=FACE_BATCH)
        parser = FaceParser(nets.parsenet, CUDA, batch_size=FACE_BATCH)
    image = np.zeros((300, 400, 3), np.uint8)  # working image 512 x 683
    # working image -> crop: faces of about 250 px along the top, as estimate_affines gives them
    affines = np.array([[[2.0, 0.0, -100.0 * index], [0.0, 2.0, -40.0]] for index in range(face_count)])
    inverse_affines = np.stack([cv2.invertAffineTransform(affine) for affine in affines])
    device_calls: dict[str, DeviceLog] = {}

    def on_device(name: str, function: Callable[..., T], *args: object) -> T:
        with DeviceLog() as call_log:
            result = function(*args)
        device_calls[name] = call_log
        return result

    def request() -> torch.Tensor:
        working, _, _, _ = on_device("locate", pipeline.locate_on_device, image, detector, CUDA)
        crops = on_device("crops", warp_crops_tensor, working, affines)
        restoring = restorer.restoring(0.5, True, to_host=False)
        restored = restoring.complete(arrived(on_device("restore", restoring.launch, crops)), crops)
        masks = None
        if PROFILES[profile].use_parse:
            masking = parser.masking(True, to_host=False)
            masks = FaceMasks(
                masking.complete(arrived(on_device("parse", masking.launch, restored)), restored)
            )
        plan, areas = on_device("plan paste", pipeline.plan_paste_on_device, working, inverse_affines)
        w_edges = device_paste.edge_widths(plan, arrived(areas))
        faces = RestoredFaces(restored)
        size = image.shape[:2]
        return arrived(
            on_device("paste", pipeline.paste_on_device, working, faces, plan, w_edges, masks, size)
        )

    output, log = run_logged(mode, request)
    assert (output.device.type, output.dtype, tuple(output.shape)) == ("cpu", torch.uint8, image.shape)
    big_uploads = [size for size in log.upload_bytes if size is None or size >= SMALL_COPY_BYTES]
    assert big_uploads == [image.nbytes], "the decoded image, once"
    # the detector's rows: how many, only the data says (F' x 16 floats, a few faces)
    assert log.download_bytes.count(None) == 1
    big_downloads = [size for size in log.download_bytes if size is not None and size >= SMALL_COPY_BYTES]
    assert big_downloads == [image.nbytes], "the finished pixels, once"
    assert log.pinned_uploads == log.uploads, "every upload from pinned memory, without blocking"
    # besides: the transforms up (crops, paste-back); down the rows, the gray sums, each net
    # stage's finiteness flags (fp16) and the faces' areas, besides the finished pixels
    assert len(log.uploads) == 3 and len(log.downloads) == 5 + int(PROFILES[profile].use_parse)
    assert areas_read == [("cpu", face_count)]
    assert finiteness_reads == [(CPU, torch.bool, (face_count,))] * (1 + int(PROFILES[profile].use_parse))
    assert log.waits == ["torchvision.nms"]  # the detector's, as on the host pixel path
    assert log.dtype_clashes == [] and log.inexact_divisions == []
    # the sync budget: the device thread waits for the device in the detector's call only, for
    # NMS's greedy pass; its small copies after it (rows, sums) come once the device has run it
    locate = device_calls.pop("locate")
    assert locate.waits == ["torchvision.nms"] and len(locate.downloads) == 2
    assert list(device_calls) == [
        "crops",
        "restore",
        *["parse"] * PROFILES[profile].use_parse,
        "plan paste",
        "paste",
    ]
    for name, call_log in device_calls.items():
        assert call_log.waits == [], name
        assert call_log.downloads == call_log.pinned_downloads, f"{name}: a download that blocks"


def test_downloads_queue_pinned_copies_behind_one_event_on_their_devices_stream(mode: FakeTensorMode) -> None:
    """On whichever GPU the tensors are (here the second), not the current device's stream."""
    second = torch.device("cuda", 1)
    with mode:
        rows, flags = torch.empty((3, 4), device=second), torch.empty(3, dtype=torch.bool, device=second)
    with mode, fake_cuda_events() as events, DeviceLog() as log:
        copies = downloads(rows, flags)
        assert events.recorded == [second] and events.waited == [], "queued, nothing waited for"
        host_rows, host_flags = arrived(copies)
    assert log.downloads == log.pinned_downloads and len(log.downloads) == 2
    assert events.waited == [threading.current_thread().name] * 2  # one event, waited for by the reader
    assert (host_rows.device.type, host_flags.dtype) == ("cpu", torch.bool)
