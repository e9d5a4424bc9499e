"""The `medlava` command. Thin: parse, call the package, print."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Local, private medical image analysis.")

ModelOpt = Annotated[Path | None, typer.Option("--model", help="Model folder (HF Llava or LLaVA-Med).")]
VisionTowerOpt = Annotated[
    Path | None, typer.Option("--vision-tower", help="Local CLIP folder for original LLaVA-Med checkpoints.")
]

ConvOpt = Annotated[str | None, typer.Option(help="Prompt template (default: the model's own).")]
WindowOpt = Annotated[str | None, typer.Option(help="CT window: lung, mediastinum, bone or brain.")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: the model's).")]
QuantOpt = Annotated[
    str | None,
    typer.Option("--quantization", help="int8 or int4: the decoder layers' weights, weight-only (CPU; smaller, and "
                 "faster one request at a time, slower in large batches)."),
]
MaxTokensOpt = Annotated[int, typer.Option(min=1)]
TemperatureOpt = Annotated[float, typer.Option(min=0.0)]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0)]


def parse_size(text: str) -> int:
    """'2GiB', '512M', '1073741824' -> bytes (K, M, G are binary units, with or without 'iB'/'B')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmg])(?:i?b)?)?\s*", text, re.IGNORECASE)
    value = float(m[1]) * 1024 ** " kmg".index((m[2] or " ").lower()) if m else 0
    if value < 1:
        raise typer.BadParameter(f"{text!r} is not a positive size: use e.g. 2GiB, 512MiB or a number of bytes")
    return int(value)


KvMemoryOpt = Annotated[
    int | None,
    typer.Option(
        "--kv-cache-memory",
        parser=parse_size,
        metavar="SIZE",
        help="KV cache pool size, e.g. 2GiB (default: 1GiB on CPU, 80% of free GPU memory).",
    ),
]


VolumesOpt = Annotated[
    str,
    typer.Option("--volumes", help="auto: read a series or volume whole and answer on its most telling slice; "
                 "middle: look at the middle slice only."),
]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def run_guarded(fn, *args, **kwargs):
    """Call into the package; a user's mistake becomes one line on stderr and exit status 2."""
    from medlava.errors import MedlavaError

    try:
        return fn(*args, **kwargs)
    except (MedlavaError, ValueError, OSError) as e:
        fail(str(e) or type(e).__name__)


@app.command()
def ask(
    image: Annotated[str, typer.Argument(help=".dcm, DICOM folder, .nii/.nii.gz, .png or .jpg")],
    question: Annotated[str, typer.Argument(help="The question about the image.")],
    model: ModelOpt = None,
    vision_tower: VisionTowerOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: int | None = None,
    window: WindowOpt = None,
    conv_mode: ConvOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantOpt = None,
    device: str = "cpu",
    kv_cache_memory: KvMemoryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Answer QUESTION about IMAGE."""
    from medlava import Analyzer, SamplingParams
    from medlava.imaging import load_study

    params = run_guarded(
        SamplingParams, temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens
    )
    study = run_guarded(load_study, image, window=window, key_slices=None)  # a volume whole; before the (slow) model load
    analyzer = run_guarded(
        Analyzer,
        model,
        vision_tower=vision_tower,
        dtype=dtype,
        quantization=quantization,
        device=device,
        conv_mode=conv_mode,
        kv_cache_memory=kv_cache_memory,
    )
    result = run_guarded(analyzer.ask, study, question, params)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(result.answer)


@app.command()
def chat(
    image: Annotated[str, typer.Argument(help=".dcm, DICOM folder, .nii/.nii.gz, .png or .jpg")],
    model: ModelOpt = None,
    url: Annotated[str | None, typer.Option(help="A running medlava server (http://HOST:PORT) instead of a local model.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="MEDLAVA_API_KEY", help="Bearer key for --url.")] = None,
    vision_tower: VisionTowerOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: int | None = None,
    window: WindowOpt = None,
    conv_mode: ConvOpt = None,
    dtype: DtypeOpt = None,
    device: str = "cpu",
    kv_cache_memory: KvMemoryOpt = None,
) -> None:
    """Talk about IMAGE, turn after turn, answers streamed; questions line by line from stdin when piped."""
    import sys

    from medlava import Analyzer, SamplingParams
    from medlava.imaging import load_study
    from medlava.serve.chat_cli import LocalChat, RemoteChat, questions, run

    if url and (model or vision_tower or conv_mode or dtype or kv_cache_memory):
        fail("--url talks to a server, which has its own model: drop --model/--vision-tower/--conv-mode/--dtype")
    params = run_guarded(SamplingParams, temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens)
    study = run_guarded(load_study, image, window=window, key_slices=None)  # before the (slow) model load
    if url:
        session = _remote_guarded(RemoteChat, url, image, study, params, window=window, api_key=api_key)
    else:
        analyzer = run_guarded(Analyzer, model, vision_tower=vision_tower, dtype=dtype, device=device,
                               conv_mode=conv_mode, kv_cache_memory=kv_cache_memory)
        session = LocalChat(analyzer, study, params)
    if sys.stdin.isatty():
        typer.echo("Ask about the study; an empty line is skipped, 'exit' or Ctrl-D ends.", err=True)
    _remote_guarded(run, session, questions(sys.stdin, sys.stdout))


def _remote_guarded(fn, *args, **kwargs):
    """run_guarded, and a server's refusal or an unreachable server is one line too."""
    import openai

    try:
        return run_guarded(fn, *args, **kwargs)
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        fail(f"the server answered {e.status_code}: {body.get('message') or e.message}")
    except openai.APIConnectionError as e:
        fail(f"cannot reach the server: {e.__cause__ or e}")
    except openai.APIError as e:  # an error event in the middle of a stream
        fail(f"the server failed: {e.message}")


@app.command()
def explain(
    image: Annotated[str, typer.Argument(help=".dcm, DICOM folder, .nii/.nii.gz, .png or .jpg")],
    question: Annotated[str, typer.Argument(help="A question whose answer names a finding to localise.")],
    out: Annotated[Path, typer.Option("--out", help="Overlay PNG to write (the study's own size).")],
    method: Annotated[str, typer.Option(help="relevance (attention relevance) or occlusion.")] = "relevance",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    model: ModelOpt = None,
    vision_tower: VisionTowerOpt = None,
    window: WindowOpt = None,
    dtype: DtypeOpt = None,
    device: str = "cpu",
) -> None:
    """Answer QUESTION about IMAGE and show where the answer came from (peak, box, heatmap PNG)."""
    from medlava import Analyzer
    from medlava.analysis.grounding import METHODS
    from medlava.imaging import load_study

    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    study = run_guarded(load_study, image, window=window, key_slices=None)  # a volume whole; before the (slow) model load
    analyzer = run_guarded(Analyzer, model, vision_tower=vision_tower, dtype=dtype, device=device)
    result = run_guarded(analyzer.explain, study, question, method)  # "no" answers: nothing to localise
    run_guarded(result.save_overlay, out)
    typer.echo(json.dumps(result.to_dict()) if as_json else result.answer)


REPORT_FORMATS = ("text", "json", "fhir", "sr")
GroundingOpt = Annotated[
    str, typer.Option("--grounding", help="How findings get their boxes: relevance, occlusion or none.")
]


def check_grounding(grounding: str) -> None:
    from medlava.analysis.grounding import METHODS

    if grounding not in (*METHODS, "none"):
        fail(f"--grounding must be one of {', '.join(METHODS)}, none; got {grounding!r}")


@app.command()
def report(
    image: Annotated[str, typer.Argument(help=".dcm, DICOM folder, .nii/.nii.gz, .png or .jpg")],
    fmt: Annotated[str, typer.Option("--format", help="text (Markdown), json, fhir (R4B Bundle) or sr (DICOM SR).")] = "text",
    out: Annotated[Path | None, typer.Option("--out", help="File to write (default: stdout; sr needs it).")] = None,
    model: ModelOpt = None,
    vision_tower: VisionTowerOpt = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 512,
    window: WindowOpt = None,
    dtype: DtypeOpt = None,
    device: str = "cpu",
    kv_cache_memory: KvMemoryOpt = None,
    grounding: GroundingOpt = "occlusion",
) -> None:
    """Draft a structured radiology report of IMAGE (an AI draft for a clinician to review)."""
    from medlava import Analyzer, SamplingParams
    from medlava.imaging import load_study

    if fmt not in REPORT_FORMATS:
        fail(f"--format must be one of {', '.join(REPORT_FORMATS)}, got {fmt!r}")
    check_grounding(grounding)
    if fmt == "sr":
        from medlava.analysis.sr import source_frames

        if out is None:
            fail("--format sr writes a DICOM file: give it --out FILE.dcm (it cannot go to stdout)")
        run_guarded(source_frames, image)  # only DICOM can be an SR's source: refuse others before the model loads
    study = run_guarded(load_study, image, window=window, key_slices=None)  # a volume whole
    analyzer = run_guarded(Analyzer, model, vision_tower=vision_tower, dtype=dtype, device=device,
                           kv_cache_memory=kv_cache_memory)
    result = run_guarded(analyzer.report, study, SamplingParams(max_tokens=max_tokens),
                         grounding=None if grounding == "none" else grounding)
    if fmt == "sr":
        from medlava.analysis.sr import report_sr

        sr = run_guarded(report_sr, result, image)
        run_guarded(sr.save_as, out, enforce_file_format=True)
        typer.echo(f"wrote {out} (DICOM SR, {len(result.findings)} finding(s); unverified AI draft)")
        return
    if fmt == "fhir":
        from medlava.analysis.fhir import report_fhir_json

        text = report_fhir_json(result)
    else:
        text = result.model_dump_json(indent=2) if fmt == "json" else result.to_markdown()
    if out is None:
        typer.echo(text)
    else:
        run_guarded(out.write_text, text if text.endswith("\n") else text + "\n")
        typer.echo(f"wrote {out}")


@app.command()
def serve(
    model: ModelOpt = None,
    vision_tower: VisionTowerOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", help="Require Authorization: Bearer KEY on /v1 (repeatable).")
    ] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests in flight before new ones get 429.")] = 64,
    max_image_bytes: Annotated[
        int | None, typer.Option(parser=parse_size, metavar="SIZE", help="Per-image byte limit (default 16MiB).")
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(parser=parse_size, metavar="SIZE", help="Request body limit (default 32MiB).")
    ] = None,
    conv_mode: ConvOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantOpt = None,
    device: str = "cpu",
    kv_cache_memory: KvMemoryOpt = None,
    ui: Annotated[bool, typer.Option("--ui", help="Also serve the web UI at /ui (Gradio, offline).")] = False,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Run N engine replicas on Ray Serve, routed by image (see --ray-address).")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option(min=1, help="With --replicas: autoscale between --replicas and this many.")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="With --replicas: join this Ray cluster (HOST:6379; default: start one here).")
    ] = None,
    num_cpus_per_replica: Annotated[float, typer.Option(min=0.0, help="With --replicas: CPUs each engine takes.")] = 1,
    num_gpus_per_replica: Annotated[
        float, typer.Option(min=0.0, help="With --replicas: GPUs each engine takes (then it runs on CUDA).")
    ] = 0,
    routing: Annotated[
        str, typer.Option(help="With --replicas: image (a study's questions share a replica) or random.")
    ] = "image",
    backend: Annotated[
        str, typer.Option(help="medlava (its own engine) or vllm (vLLM's engine on a Hugging Face Llava folder; "
                          "it picks its device: the GPU with a CUDA build).")
    ] = "medlava",
    tensor_parallel_size: Annotated[
        int, typer.Option(min=1, help="With --backend vllm: split each layer over this many GPUs.")
    ] = 1,
    pipeline_parallel_size: Annotated[
        int, typer.Option(min=1, help="With --backend vllm: split the layers into this many stages.")
    ] = 1,
) -> None:
    """Serve the OpenAI-compatible API: /v1/chat/completions, /v1/reports, /v1/explain, /v1/models,
    /health, /metrics, and with --ui the web UI at /ui; with --replicas, on Ray Serve; with
    --backend vllm, on vLLM's engine."""
    from medlava.serve.api import (
        DEFAULT_ANALYSIS_KV_MEMORY,
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_IMAGE_BYTES,
        create_app,
        log_requests_to_stderr,
    )

    engine_kwargs = dict(vision_tower=vision_tower, dtype=dtype, device=device, quantization=quantization,
                         conv_mode=conv_mode, kv_cache_memory=kv_cache_memory)
    app_options = dict(api_keys=api_key or (), max_queue=max_queue,
                       max_image_bytes=max_image_bytes or DEFAULT_MAX_IMAGE_BYTES,
                       max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    if backend not in ("medlava", "vllm"):
        fail(f"unknown backend {backend!r}: use medlava or vllm")
    if backend == "medlava" and (tensor_parallel_size > 1 or pipeline_parallel_size > 1):
        fail("--tensor-parallel-size and --pipeline-parallel-size go with --backend vllm")
    if backend == "vllm":
        if replicas is not None or max_replicas is not None:
            fail("--replicas runs medlava's engine: with --backend vllm, scale with --tensor-parallel-size "
                 "and --pipeline-parallel-size")
        if quantization or vision_tower:
            fail("--quantization and --vision-tower are medlava's engine's: --backend vllm serves a Hugging Face "
                 "Llava folder as it is")
        if model is None:
            fail("--backend vllm needs --model FOLDER (a Hugging Face Llava folder)")
        from medlava.serve import vllm_engine

        if ray_address is not None:
            os.environ["RAY_ADDRESS"] = ray_address  # vLLM's workers join this Ray cluster
        engine = run_guarded(
            vllm_engine.VLLMEngine, model, dtype=dtype, conv_mode=conv_mode, kv_cache_memory=kv_cache_memory,
            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            ray=ray_address is not None,
        )
        analyzer = vllm_engine.FolderAnalyzer(model, dtype=dtype, device=device, conv_mode=conv_mode,
                                              kv_cache_memory=DEFAULT_ANALYSIS_KV_MEMORY)
        _serve_app(create_app(engine, analyzer=analyzer, ui=ui, **app_options), host, port, ui)
        return
    if replicas is not None:
        from medlava.serve import cluster

        if num_gpus_per_replica:
            engine_kwargs["device"] = "cuda"
        elif device != "cpu":
            fail(f"--device {device} with --replicas needs --num-gpus-per-replica (Ray gives a replica no GPU without it)")
        application = run_guarded(
            cluster.build_application, None if model is None else str(model.resolve()),
            {k: str(v) if isinstance(v, Path) else v for k, v in engine_kwargs.items()}, app_options | {"ui": ui},
            replicas=replicas, max_replicas=max_replicas, num_cpus=num_cpus_per_replica,
            num_gpus=num_gpus_per_replica, routing=routing,
        )
        typer.echo(f"serving {replicas} replica(s) on Ray Serve at {_addresses(host, port, ui)}", err=True)
        log_requests_to_stderr()  # this process's part; each replica's and the ingress' go to Ray's log folder
        run_guarded(cluster.run, application, host=host, port=port, ray_address=ray_address)
        return
    if max_replicas is not None or ray_address is not None:
        fail("--max-replicas goes with --replicas N, --ray-address with --replicas N or --backend vllm")

    from medlava.engine.async_engine import AsyncLLMEngine

    engine = run_guarded(AsyncLLMEngine, model, **engine_kwargs)
    _serve_app(create_app(engine, ui=ui, **app_options), host, port, ui)


def _serve_app(api, host: str, port: int, ui: bool) -> None:
    import uvicorn

    from medlava.serve.api import log_requests_to_stderr

    log_requests_to_stderr()
    typer.echo(f"serving {api.state.model_name} on {_addresses(host, port, ui)}", err=True)
    uvicorn.run(api, host=host, port=port, log_level="info")


def _addresses(host: str, port: int, ui: bool) -> str:
    where = f"http://{host}:{port}"
    return f"{where}/v1" + (f", the web UI on {where}/ui" if ui else "")


def _check_url(option: str, url: str) -> str:
    if not url.startswith(("http://", "https://")):
        fail(f"{option} must be a URL like http://HOST:PORT, got {url!r}")
    return url.rstrip("/")


@app.command()
def controller(
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 21001,
    dispatch: Annotated[str, typer.Option("--dispatch", "--dispatch-method",
                                          help="shortest_queue (queue length / speed) or lottery (by speed).")
                        ] = "shortest_queue",
) -> None:
    """Run the LLaVA controller: workers register with it; LLaVA clients and the OpenAI API (/v1) are routed
    to them (heartbeat expiry: $MEDLAVA_CONTROLLER_HEART_BEAT_EXPIRATION seconds, default 30)."""
    import uvicorn

    from medlava.serve.api import log_requests_to_stderr
    from medlava.serve.controller import Controller, create_controller_app

    api = create_controller_app(run_guarded(Controller, dispatch))
    log_requests_to_stderr()
    typer.echo(f"controller on http://{host}:{port} (OpenAI API at /v1), dispatch {dispatch}", err=True)
    uvicorn.run(api, host=host, port=port, log_level="info")


@app.command()
def worker(
    controller_url: Annotated[str, typer.Option("--controller", "--controller-address",
                                                help="The controller's URL, e.g. http://127.0.0.1:21001.")],
    model: ModelOpt = None,
    vision_tower: VisionTowerOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 21002,
    worker_address: Annotated[str | None, typer.Option(
        help="This worker's URL as the controller and clients reach it (default http://HOST:PORT).")] = None,
    limit_model_concurrency: Annotated[int, typer.Option(
        min=1, help="LLaVA requests in the engine at once (it batches them); more wait their turn.")] = 5,
    model_name: Annotated[str | None, typer.Option(help="Serve the model under this name (default: its folder's).")
                          ] = None,
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", help="Require Authorization: Bearer KEY on /v1 (repeatable).")
    ] = None,
    conv_mode: ConvOpt = None,
    dtype: DtypeOpt = None,
    device: str = "cpu",
    kv_cache_memory: KvMemoryOpt = None,
) -> None:
    """Run a LLaVA model worker on medlava's engine: registers with --controller, serves LLaVA's
    /worker_generate_stream and the OpenAI API (heartbeats: $MEDLAVA_WORKER_HEART_BEAT_INTERVAL s, default 15)."""
    import uvicorn

    from medlava.engine.async_engine import AsyncLLMEngine
    from medlava.serve.api import log_requests_to_stderr
    from medlava.serve.worker import create_worker_app

    controller_url = _check_url("--controller", controller_url)
    if worker_address is None:  # a wildcard host is no address to be reached at: name this machine's loopback
        worker_address = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
    worker_address = _check_url("--worker-address", worker_address)
    engine = run_guarded(AsyncLLMEngine, model, vision_tower=vision_tower, dtype=dtype, device=device,
                         conv_mode=conv_mode, kv_cache_memory=kv_cache_memory)
    api = run_guarded(create_worker_app, engine, controller_url=controller_url, worker_address=worker_address,
                      limit_model_concurrency=limit_model_concurrency, model_name=model_name,
                      api_keys=api_key or ())
    log_requests_to_stderr()
    typer.echo(f"worker for {api.state.model_name} on {worker_address}, registering with {controller_url}", err=True)
    uvicorn.run(api, host=host, port=port, log_level="info")


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Original LLaVA-Med (or any loadable) model folder.")],
    dst: Annotated[Path, typer.Argument(help="Where to write the Hugging Face Llava folder.")],
    vision_tower: VisionTowerOpt = None,
    dtype: Annotated[str | None, typer.Option(help="Save as float32, bfloat16 or float16.")] = None,
) -> None:
    """Write SRC in the Hugging Face Llava layout to DST."""
    from medlava.model.convert import convert as do_convert

    if dst.exists() and any(dst.iterdir()):
        fail(f"{dst} exists and is not empty; choose a new folder")
    out = run_guarded(do_convert, src, dst, vision_tower=vision_tower, dtype=dtype)
    typer.echo(f"wrote {out}")


@app.command()
def deid(
    src: Annotated[Path, typer.Argument(metavar="IN", help="A DICOM file, or a folder (searched recursively).")],
    dst: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output file (or folder to write into); for a folder, a new mirror tree.")
    ],
    key: Annotated[
        str | None,
        typer.Option(envvar="MEDLAVA_DEID_KEY", help="Secret that makes new UIDs repeatable across runs (default: random)."),
    ] = None,
) -> None:
    """De-identify DICOM with the PS3.15 Basic Application Level Confidentiality Profile."""
    from medlava.imaging.deid import deidentify_tree

    summary = run_guarded(deidentify_tree, src, dst, key=key)
    for message, count in summary.warnings.items():  # counts only: file names can hold PHI
        typer.echo(f"warning: {message} ({count} file{'s' * (count != 1)})", err=True)
    typer.echo(str(summary))


BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"  # in a source checkout


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="A small smoke workload; prints, writes nothing.")] = False,
    dtype: Annotated[
        list[str] | None, typer.Option("--dtype", help="float32 and/or bfloat16 (repeat; default: both).")
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="The benchmark's random model (built there if absent).")
    ] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Interleaved runs per mode; the best counts.")] = None,
    block_size: Annotated[int, typer.Option(min=1, help="The engine's KV block size in tokens.")] = 16,
    peer: Annotated[
        str | None, typer.Option("--peer", help="Add a peer engine as mode (d): vllm (bash bench/peers/setup_vllm.sh first).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every row as JSON on stdout (the progress log goes to stderr).")
    ] = False,
    quantization: Annotated[
        list[str] | None, typer.Option("--quantization", help="Add engine rows on int8 and/or int4 weights (repeat).")
    ] = None,
) -> None:
    """Engine throughput against Hugging Face generate (bench/bench_engine.py); the full run updates docs/BENCHMARKS.md."""
    import importlib.util

    dtypes = tuple(dtype or ("float32", "bfloat16"))
    bad = sorted(set(dtypes) - {"float32", "bfloat16"})
    if bad:
        fail(f"--dtype must be float32 or bfloat16, got {', '.join(bad)}")
    script = BENCH_DIR / "bench_engine.py"
    if not script.is_file():
        fail(f"{script} not found: benchmarks run from a source checkout (git clone, then pip install -e .)")
    spec = importlib.util.spec_from_file_location("medlava_bench_engine", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
    results = run_guarded(
        module.run_benchmark, quick, dtypes=dtypes, model_dir=model_dir, rounds=rounds, block_size=block_size, peer=peer,
        quantizations=tuple(quantization or ()), log=log,
    )
    if as_json:
        typer.echo(json.dumps(module.json_rows(results), indent=1))


train_app = typer.Typer(
    no_args_is_help=True, help="Train models: the demo model's stages, or fine-tune your own."
)
app.add_typer(train_app, name="train")

DataOpt = Annotated[Path, typer.Option("--data", help="LLaVA-format JSON (id, image, conversations).")]
ImagesOpt = Annotated[
    Path, typer.Option("--image-folder", help="Folder the JSON's image paths are relative to.")
]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder to write the trained model to.")]
WorldOpt = Annotated[Path, typer.Option("--world", help="A folder written by `medlava synth`.")]


StepsOpt = Annotated[int | None, typer.Option("--steps", help="Optimizer steps (overrides --epochs).")]
JitterOpt = Annotated[
    float,
    typer.Option(
        "--intensity-jitter", min=0.0, help="Scale each training image's intensities by up to 1 + this either way (0 = off)."
    ),
]


def _run_stage(**settings) -> None:
    from medlava.train.trainer import TrainSettings, train

    if settings["model"] is None:
        fail("--model is required: the folder to start training from")
    result = run_guarded(train, TrainSettings(**settings))
    typer.echo(
        f"{settings['stage']}: {result.steps} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
        f"{result.tokens_per_s:,.0f} tok/s; wrote {result.out}"
    )


@train_app.command("align")
def train_align(
    data: DataOpt,
    image_folder: ImagesOpt,
    out: OutOpt,
    model: ModelOpt = None,
    max_steps: StepsOpt = None,
    epochs: float = 1.0,
    batch_size: int = 16,
    grad_accum: int = 1,
    lr: float = 1e-3,
    warmup_ratio: float = 0.03,
    max_len: int = 512,
    save_every: int = 0,
    seed: int = 0,
    conv_mode: ConvOpt = None,
    intensity_jitter: JitterOpt = 0.0,
) -> None:
    """Stage 1: train the projector only, on caption pairs (feature alignment)."""
    _run_stage(stage="align", **locals())


@train_app.command("instruct")
def train_instruct(
    data: DataOpt,
    image_folder: ImagesOpt,
    out: OutOpt,
    model: ModelOpt = None,
    max_steps: StepsOpt = None,
    epochs: float = 1.0,
    batch_size: int = 16,
    grad_accum: int = 1,
    lr: float = 2e-4,
    warmup_ratio: float = 0.03,
    max_len: int = 512,
    save_every: int = 0,
    seed: int = 0,
    conv_mode: ConvOpt = None,
    train_vision: Annotated[bool, typer.Option(help="Also train the vision tower.")] = False,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank for the decoder (0 = full fine-tuning).")] = 0,
    shuffle_turns: Annotated[
        bool, typer.Option(help="Reorder each conversation's Q/A pairs every epoch.")
    ] = False,
    intensity_jitter: JitterOpt = 0.0,
) -> None:
    """Stage 2: train projector + decoder (or LoRA adapters) on instructions."""
    _run_stage(stage="instruct", **locals())


@train_app.command("init")
def train_init(world: WorldOpt, out: OutOpt, vocab_size: int = 1024, seed: int = 0) -> None:
    """Start the demo model: a BPE tokenizer trained on the world's text and random weights."""
    from medlava.train.demo_init import init_demo_model

    typer.echo(f"wrote {run_guarded(init_demo_model, world, out, vocab_size=vocab_size, seed=seed)}")


@train_app.command("vision")
def train_vision_tower(
    world: WorldOpt,
    out: OutOpt,
    model: ModelOpt = None,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    intensity_jitter: JitterOpt = 0.0,
) -> None:
    """Stage 0 (demo model only): pretrain the vision tower on the world's labels."""
    from medlava.train.vision_pretrain import pretrain_vision

    if model is None:
        fail("--model is required: the folder whose vision tower to pretrain")
    metrics = run_guarded(
        pretrain_vision, model, world, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        intensity_jitter=intensity_jitter,
    )
    typer.echo("held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f"; wrote {out}")


@app.command()
def synth(
    out: OutOpt,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of studies.")] = 100,
    seed: int = 0,
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 224,
    volumes: Annotated[
        bool, typer.Option("--volumes", help="CT series and MRI masses off the middle slice (tests volume analysis).")
    ] = False,
) -> None:
    """Write a synthetic phantom world: images with known findings, questions, instructions, reports."""
    from medlava.train.synthetic import main as synth_main

    argv = ["--out", str(out), "--n", str(n), "--seed", str(seed), "--size", str(size)]
    code = synth_main(argv + (["--volumes"] if volumes else []))
    if code:
        raise typer.Exit(code)


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models on medical VQA benchmarks.")
app.add_typer(eval_app, name="eval")


@eval_app.command("vqa")
def eval_vqa(
    questions: Annotated[Path, typer.Option("--questions", help="LLaVA-Med model_vqa question JSONL.")],
    image_folder: ImagesOpt,
    answers: Annotated[Path, typer.Option("--answers", help="Answers JSONL to write (resumes if present).")],
    model: ModelOpt = None,
    vision_tower: VisionTowerOpt = None,
    num_chunks: Annotated[int, typer.Option(min=1)] = 1,
    chunk_idx: Annotated[int, typer.Option(min=0)] = 0,
    conv_mode: Annotated[
        str | None, typer.Option("--conv-mode", help="Conversation template (LLaVA-Med v1.5: mistral_instruct); "
                                 "default: the model's own.")
    ] = None,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="0 = greedy (LLaVA-Med's README runs 0.0; model_vqa's default is 0.2).")
    ] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling (model_vqa: off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed (model_vqa calls set_seed(0)).")] = 0,
    max_tokens: Annotated[int, typer.Option(min=1, help="model_vqa's max_new_tokens.")] = 1024,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions sent to the engine at once.")] = 64,
    shuffle_images: Annotated[
        int | None, typer.Option(help="Control run: give each question another study's image (seed).")
    ] = None,
    volumes: VolumesOpt = "auto",
    dtype: str | None = None,
    quantization: QuantOpt = None,
    device: str = "cpu",
    kv_cache_memory: KvMemoryOpt = None,
) -> None:
    """Answer every question of a model_vqa file (one chunk of it with --num-chunks/--chunk-idx)."""
    from rich.progress import Progress

    from medlava import Analyzer
    from medlava.eval.vqa import run_vqa

    analyzer = run_guarded(
        Analyzer, model, vision_tower=vision_tower, dtype=dtype, device=device, kv_cache_memory=kv_cache_memory,
        conv_mode=conv_mode, quantization=quantization,
    )
    with Progress(transient=True) as bar:
        task = bar.add_task("answering", total=None)
        added = run_guarded(
            run_vqa,
            questions,
            image_folder,
            answers,
            analyzer,
            num_chunks=num_chunks,
            chunk_idx=chunk_idx,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            shuffle_images_seed=shuffle_images,
            volumes=volumes,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    typer.echo(f"answered {added} questions; answers in {answers}")


@eval_app.command("score")
def eval_score(
    answers: Annotated[Path, typer.Option("--answers", help="Answers JSONL from `medlava eval vqa`.")],
    gold: Annotated[Path, typer.Option("--gold", help="Question JSONL with answer and answer_type.")],
    out: Annotated[Path | None, typer.Option("--out", help="Where to save the scores as JSON.")] = None,
    metrics: Annotated[
        str, typer.Option("--metrics", help="medlava: whole-word scores by group beside the majority baseline; "
                          "llava-med: LLaVA-Med v1.0 run_eval.py's numbers (the paper's tables).")
    ] = "medlava",
) -> None:
    """Score answers: closed accuracy, open recall, exact match, token F1, beside the majority baseline."""
    from rich.console import Console

    from medlava.eval.table import llava_med_table, score_table
    from medlava.eval.vqa import score, score_llava_med

    if metrics not in ("medlava", "llava-med"):
        fail(f"--metrics must be medlava or llava-med, got {metrics!r}")
    if metrics == "llava-med":
        result = run_guarded(score_llava_med, answers, gold)
        Console(width=140).print(llava_med_table(result))
    else:
        result = run_guarded(score, answers, gold)
        Console(width=140).print(score_table(result))
    target = out or answers.with_suffix(".llava-med.scores.json" if metrics == "llava-med" else ".scores.json")
    target.write_text(json.dumps(result, indent=1))
    typer.echo(f"scores saved to {target}")


@eval_app.command("import")
def eval_import(
    dataset: Annotated[str, typer.Argument(help="vqa-rad, slake or pathvqa.")],
    source: Annotated[Path, typer.Argument(help="The dataset's released question file (JSON; PathVQA also .pkl).")],
    out: Annotated[Path, typer.Option("--out", help="model_vqa question JSONL to write.")],
) -> None:
    """Convert VQA-RAD / SLAKE / PathVQA question files to model_vqa questions with answer and answer_type."""
    from medlava.eval.importers import import_questions

    counts = run_guarded(import_questions, dataset, source, out)
    typer.echo(f"{counts['questions']} questions ({counts['closed']} closed, {counts['open']} open) in {out}"
               + (f"; {counts['skipped']} skipped ({counts['skipped_why']})" if counts["skipped"] else ""))


@eval_app.command("judge")
def eval_judge(
    questions: Annotated[Path, typer.Option("--questions", help="The question JSONL (reference: gpt4_answer or answer).")],
    answers: Annotated[Path, typer.Option("--answers", help="Answers JSONL from `medlava eval vqa`.")],
    base_url: Annotated[str, typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1.")],
    judge_model: Annotated[str, typer.Option("--judge-model", help="Model name the endpoint serves (LLaVA-Med: gpt-4-0314).")],
    out: Annotated[Path, typer.Option("--out", help="Reviews JSONL to write (resumes if present).")],
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="OPENAI_API_KEY", show_envvar=True, help="Endpoint key.")
    ] = None,
    max_retries: Annotated[int, typer.Option(min=0, help="Retries on 429/5xx, with exponential backoff.")] = 6,
    timeout: Annotated[float, typer.Option(min=1.0, help="Seconds per request.")] = 120.0,
) -> None:
    """Have a judge model review each answer against the reference with LLaVA-Med's GPT-review prompt."""
    from rich.progress import Progress

    from medlava.eval.judge import run_judge

    with Progress(transient=True) as bar:
        task = bar.add_task("reviewing", total=None)
        result = run_guarded(run_judge, questions, answers, out, judge_model=judge_model, base_url=base_url,
                             api_key=api_key, max_retries=max_retries, timeout=timeout,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
    typer.echo(f"reviewed {result['reviewed']} answers ({result['already_reviewed']} already in {out}, "
               f"{result['unanswered']} questions without an answer); reviews in {out}")
    if result["malformed"]:
        ids = ", ".join(map(str, result["malformed"][:20])) + (" …" if len(result["malformed"]) > 20 else "")
        typer.echo(f"malformed replies (first line not two scores): {len(result['malformed'])}: {ids}")


@eval_app.command("summarize")
def eval_summarize(
    reviews: Annotated[Path, typer.Argument(help="Reviews JSONL from `medlava eval judge`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """LLaVA-Med's review table: judge score, model score, relative score and count by type, domain, overall."""
    from rich.console import Console

    from medlava.eval.judge import summarize
    from medlava.eval.table import review_table

    result = run_guarded(summarize, reviews)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        Console(width=140).print(review_table(result))


@eval_app.command("report")
def eval_report(
    world: WorldOpt,
    model: ModelOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Reports JSONL to write (scores beside it).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 512,
    batch_size: Annotated[int, typer.Option(min=1, help="Studies sent to the engine at once.")] = 64,
    grounding: GroundingOpt = "occlusion",
    dtype: str | None = None,
    quantization: QuantOpt = None,
    device: str = "cpu",
) -> None:
    """Draft a report for every study of a phantom world and score its findings against the truth."""
    from rich.console import Console

    from medlava import Analyzer, SamplingParams
    from medlava.eval.reports import evaluate_reports, read_world, write_reports
    from medlava.eval.table import report_table

    check_grounding(grounding)
    studies = run_guarded(read_world, world)
    analyzer = run_guarded(Analyzer, model, dtype=dtype, device=device, quantization=quantization)
    images = [str(Path(world) / "images" / s.image) for s in studies]
    params = SamplingParams(max_tokens=max_tokens)
    reports = []
    for start in range(0, len(images), batch_size):
        reports += run_guarded(analyzer.report_many, images[start : start + batch_size], params,
                               grounding=None if grounding == "none" else grounding)
    result = run_guarded(evaluate_reports, world, reports)
    Console(width=140).print(report_table(result))
    target = out or Path(world) / "reports.eval.jsonl"
    write_reports(target, studies, reports)
    target.with_suffix(".scores.json").write_text(json.dumps(result, indent=1))
    typer.echo(f"reports in {target}; scores in {target.with_suffix('.scores.json')}")
