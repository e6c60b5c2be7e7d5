"""The OpenAI-compatible server on localhost, driven by the real `openai` client and httpx: a tiny MoE with the byte
tokenizer, one engine behind a uvicorn server started in a thread. Greedy completions are compared with
`model.generate` on the same prompt (an independent decoding path: a contiguous cache, no paging or batching)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from moeformer.models import ModelConfig, build_model
from moeformer.models.model import from_pretrained
from moeformer.serving import Engine
from moeformer.serving.runner import EngineRunner
from moeformer.serving.server import create_app
from moeformer.training.data import prepare_corpus
from moeformer.training.tokenizer import ByteTokenizer, load_tokenizer
from tests.test_scripts import script
from tests.test_train_distributed import kill_tree
from tests.workers import REPO, worker_env

MAX_SEQ_LEN = 96
TOO_LONG = "y" * MAX_SEQ_LEN


def tiny_moe(max_seq_len: int = MAX_SEQ_LEN) -> ModelConfig:
    return ModelConfig.from_name(
        "tiny-moe",
        n_layers=2,
        dim=64,
        n_heads=4,
        ffn_dim=128,
        vocab_size=258,
        moe={"ffn_dim": 64},
        max_seq_len=max_seq_len,
    )


def greedy_text(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """The reference: `model.generate` alone on the prompt, decoded."""
    ids = torch.tensor([tokenizer.encode_prompt(prompt)], device=next(model.parameters()).device)
    out = model.generate(ids, max_tokens, temperature=0.0)[0, ids.shape[1] :].cpu()
    return tokenizer.decode(out[out < tokenizer.vocab_size].tolist())


served_options = {"step_delay": 0.0, "fail": False}  # the served engine's sleep before each step; fail the next


@dataclass
class Served:
    url: str
    engine: Engine
    model: object
    tokenizer: ByteTokenizer
    finished: list  # the engine's finished StepOutputs, in order

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def greedy(self, prompt: str, max_tokens: int) -> str:
        return greedy_text(self.model, self.tokenizer, prompt, max_tokens)

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """The engine's stats once it holds no request (fails after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished():
            assert time.monotonic() < deadline, "the engine did not become idle"
            time.sleep(0.02)
        return self.engine.stats()


@contextmanager
def serving(engine: Engine, tokenizer, api_key: str | None = None) -> Iterator[str]:
    """A uvicorn server of `engine` as "tiny" on a free localhost port, in a thread; yields its URL."""
    app = create_app(EngineRunner(engine), tokenizer, "tiny", api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    model = build_model(tiny_moe()).eval()
    tokenizer = ByteTokenizer()
    # no eos: a random model's greedy text runs to max_tokens, so lengths (and the disconnect test) are known
    engine = Engine(model, max_batch=4, block_size=8)
    finished, step = [], engine.step

    def recorded_step():  # the engine's own step, its finished outputs kept for the tests; slowed or failed on demand
        time.sleep(served_options["step_delay"])
        if served_options["fail"]:
            served_options["fail"] = False
            raise RuntimeError("device lost")
        outputs = step()
        finished.extend(o for o in outputs if o.finished)
        return outputs

    engine.step = recorded_step
    with serving(engine, tokenizer) as url:
        yield Served(url, engine, model, tokenizer, finished)


def test_completion_is_the_models_greedy_text_for_a_string_or_token_ids(served):
    expected = served.greedy("def add(a, b):", 12)
    out = served.client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=12, temperature=0)
    prompt_ids = served.tokenizer.encode_prompt("def add(a, b):")
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(prompt_ids),
        12,
        len(prompt_ids) + 12,
    )
    by_ids = served.client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == expected


def test_streamed_chunks_join_to_the_completion_and_end_with_done(served):
    expected = served.greedy("import os", 10)
    chunks = list(
        served.client.completions.create(model="tiny", prompt="import os", max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    body = {
        "prompt": "import os",
        "max_tokens": 10,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    data = [json.loads(line[len("data: ") :]) for line in events[:-1]]
    assert "".join(d["choices"][0]["text"] for d in data if d["choices"]) == expected
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == 10


def test_several_prompts_give_one_choice_each(served):
    prompts = ["def a():", "b = [", "# c"]
    expected = [served.greedy(p, 8) for p in prompts]
    ids = [served.tokenizer.encode_prompt(p) for p in prompts]
    out = served.client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0)
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [
        (i, t, "length") for i, t in enumerate(expected)
    ]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (sum(map(len, ids)), 3 * 8)
    texts, reasons = ["", "", ""], {}
    for chunk in served.client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, stream=True):
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            reasons[choice.index] = choice.finish_reason
    assert texts == expected and reasons == {0: "length", 1: "length", 2: "length"}
    refused = httpx.post(f"{served.url}/v1/completions", json={"prompt": ["ok", TOO_LONG]}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("prompt 1: ")
    stats = served.wait_idle()  # the first prompt, accepted before the second was refused, is gone too
    assert stats["free_blocks"] == stats["total_blocks"]


def test_concurrent_requests_each_get_their_own_greedy_text(served):
    """Three times as many clients as the engine's batch, streaming or not, a third of them leaving after their
    first event: some wait for a slot while others run or leave; every finished one gets its own greedy text."""
    prompts = [
        "a",
        "class Foo:",
        "for i in range(",
        "# a much longer comment line",
        "x",
        "yield",
        "if x:",
        "[1, 2",
        "return",
        "import sys",
        "def main():",
        "print(",
    ]

    async def ask(client: openai.AsyncOpenAI, i: int) -> str | None:
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 4 + 2 * i, "temperature": 0}
        if i % 3 == 2:  # leaves after its first event
            async with client.completions.with_streaming_response.create(**body, stream=True) as response:
                async for _ in response.iter_lines():
                    return None
        if i % 3 == 1:
            return "".join([c.choices[0].text async for c in await client.completions.create(**body, stream=True)])
        return (await client.completions.create(**body)).choices[0].text

    async def ask_all() -> list[str | None]:
        async with openai.AsyncOpenAI(
            base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60
        ) as client:
            return await asyncio.gather(*(ask(client, i) for i in range(len(prompts))))

    texts = asyncio.run(ask_all())
    assert texts == [None if i % 3 == 2 else served.greedy(p, 4 + 2 * i) for i, p in enumerate(prompts)]
    stats = served.wait_idle()
    assert stats["free_blocks"] == stats["total_blocks"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_engine_serves_concurrent_greedy_texts(monkeypatch):
    """The engine on its own thread with a compiled decode step (CUDA graphs captured there), fp32 without TF32:
    concurrent requests get the greedy text of `model.generate` (eager) on the same device."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_moe()).cuda().eval(), ByteTokenizer()
    prompts = ["a", "class Foo:", "for i in range(", "# a much longer comment line"]
    with serving(Engine(model, max_batch=4, block_size=8, compile=True), tokenizer) as url:

        async def ask_all() -> list[str]:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            outs = await asyncio.gather(
                *(client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0) for p in prompts)
            )
            await client.close()
            return [o.choices[0].text for o in outs]

        assert asyncio.run(ask_all()) == [greedy_text(model, tokenizer, p, 16) for p in prompts]


def test_seeded_sampling_repeats_and_top_k_is_applied(served):
    def sample(seed: int) -> str:
        return (
            served.client.completions.create(
                model="tiny", prompt="x = ", max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(3) == sample(3) and served.greedy("x = ", 12) != sample(3)
    top1 = served.client.completions.create(
        model="tiny", prompt="x = ", max_tokens=12, temperature=1.0, seed=3, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == served.greedy("x = ", 12)  # top_k (an extension) reaches the sampler


def test_stop_string_ends_the_text_before_it_and_frees_the_slot(served):
    full = served.greedy("def f(x):", 40)
    stop = full[10:12]  # a string the greedy text reaches after 10 characters (or earlier)
    start = full.find(stop)
    out = served.client.completions.create(
        model="tiny", prompt="def f(x):", max_tokens=40, temperature=0, stop=[stop, "\x00never"]
    )
    assert out.choices[0].text == full[:start] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 40
    chunks = list(
        served.client.completions.create(
            model="tiny", prompt="def f(x):", max_tokens=40, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == full[:start] and chunks[-1].choices[0].finish_reason == "stop"
    stats = served.wait_idle()
    assert stats["free_blocks"] == stats["total_blocks"]


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"prompt": "a", "max_tokens": 4', None),  # malformed JSON
        ('["a"]', None),  # not an object
        ('{"max_tokens": 4}', "prompt"),  # missing
        ('{"prompt": "a", "max_tokens": -1}', "max_tokens"),
        ('{"prompt": "a", "max_tokens": 0}', "max_tokens"),
        ('{"prompt": "a", "max_tokens": "4"}', "max_tokens"),  # wrong type, even when convertible
        ('{"prompt": "a", "temperature": "hot"}', "temperature"),
        ('{"prompt": "a", "temperature": Infinity}', "temperature"),  # Python's JSON reads it; not a temperature
        ('{"prompt": "a", "top_p": 1.5}', "top_p"),
        ('{"prompt": "a", "seed": 18446744073709551616}', "seed"),
        ('{"prompt": "a", "stream": "yes"}', "stream"),
        ('{"prompt": "a", "stop": ["ok", ""]}', "stop"),
        ('{"prompt": [1, "b"]}', "prompt"),
        ('{"prompt": [1, 300]}', "prompt"),  # outside the vocabulary
        ('{"prompt": []}', "prompt"),
        ('{"prompt": [[1, 2], []]}', "prompt"),
        (json.dumps({"prompt": TOO_LONG}), "prompt"),  # longer than the context
        (json.dumps({"prompt": TOO_LONG, "stream": True}), "prompt"),  # refused before any event is sent
        (json.dumps({"prompt": TOO_LONG[:80], "max_tokens": 30}), "max_tokens"),  # no room left for max_tokens
        ('{"prompt": "a", "model": "gpt-4"}', "model"),
        ('{"prompt": "a", "n": 2}', "n"),
        ('{"prompt": "a", "logprobs": 2}', "logprobs"),  # not supported: refused, never ignored
    ],
)
def test_bad_requests_are_400_naming_the_field(served, body, param):
    response = httpx.post(
        f"{served.url}/v1/completions", content=body, timeout=60, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    if param is not None:
        assert param in error["message"]


def test_the_openai_client_sees_a_bad_request_error(served):
    with pytest.raises(openai.BadRequestError) as caught:
        served.client.completions.create(model="tiny", prompt="a", max_tokens=-3)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "max_tokens"


def test_models_health_and_unknown_paths(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and served.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("gpt-4")
    missing = httpx.get(f"{served.url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    health = httpx.get(f"{served.url}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_an_api_key_guards_the_v1_endpoints():
    torch.manual_seed(0)
    engine = Engine(build_model(tiny_moe()).eval(), max_batch=2, block_size=8)
    with serving(engine, ByteTokenizer(), api_key="s3cret") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert client.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens == 2
        for key in ("wrong", "s3cret-but-longer"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).models.list()
        anonymous = httpx.post(f"{url}/v1/completions", content="{bad json", timeout=10)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # health checks need no key


@pytest.mark.parametrize("stream", [True, False])
def test_an_engine_error_fails_the_running_request_and_serving_goes_on(served, stream):
    served.wait_idle()
    served_options["fail"] = True
    body = {"prompt": "try:", "max_tokens": 8, "temperature": 0, "stream": stream}
    response = httpx.post(f"{served.url}/v1/completions", json=body, timeout=60)
    if stream:  # the status line was sent before the error: it ends the event stream
        assert response.status_code == 200 and "data: [DONE]" not in response.text
        error = json.loads(response.text.strip().splitlines()[-1][len("data: ") :])["error"]
    else:
        assert response.status_code == 500
        error = response.json()["error"]
    assert error["type"] == "server_error" and "device lost" in error["message"]
    stats = served.wait_idle()
    assert stats["free_blocks"] == stats["total_blocks"]
    out = served.client.completions.create(model="tiny", prompt="try:", max_tokens=8, temperature=0)
    assert out.choices[0].text == served.greedy("try:", 8)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_mid_request_frees_its_slot(served, stream, monkeypatch):
    monkeypatch.setitem(served_options, "step_delay", 0.01)  # 80 tokens take >= 0.8 s: the client leaves first
    served.wait_idle()
    before = len(served.finished)
    body = {"prompt": "while True:", "max_tokens": 80, "temperature": 0, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i == 2:
                    break  # leaves the block: the connection closes mid-stream
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{served.url}/v1/completions", json=body, timeout=0.2)
    stats = served.wait_idle()
    assert [o.finish_reason for o in served.finished[before:]] == ["abort"]
    assert stats["free_blocks"] == stats["total_blocks"]


# ---- scripts/serve.py ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny MoE saved the way a training run exports it: native weights + the byte corpus's meta.json."""
    root = tmp_path_factory.mktemp("export")
    prepare_corpus(root / "data", max_files=2, val_fraction=0.5)
    torch.manual_seed(1)
    build_model(tiny_moe(128)).save_pretrained(root / "model", format="native")
    shutil.copyfile(root / "data" / "meta.json", root / "model" / "meta.json")
    return root / "model"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/missing"], "checkpoint directory {tmp}/missing does not exist"),
        (
            ["--model", "{tmp}", "--tp", "2"],
            "--tp 2 --ep 1 serves one copy of the model over max(tp, ep) = 2 processes, "
            "got 1 (torchrun --nproc_per_node 2)",
        ),
    ],
)
def test_serve_script_reports_a_bad_start_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        script("serve").main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {message.format(tmp=tmp_path)}"


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.mark.distributed
@pytest.mark.parametrize("gpus", [False, pytest.param(True, marks=[pytest.mark.gpu, TWO_GPUS])], ids=["gloo", "nccl"])
@pytest.mark.parametrize("layout", ["--tp", "--ep"])
def test_two_ranks_serve_the_one_process_greedy_text(export, tmp_path, layout, gpus):
    """`torchrun --nproc_per_node 2 scripts/serve.py --tp 2` (or --ep 2), on the CPU (gloo) or two GPUs (fp32):
    rank 0 answers over HTTP with the other rank stepping beside it; the text is the single-process model's greedy
    text; SIGINT ends both ranks."""
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",  # a free port
        str(REPO / "scripts" / "serve.py"),
        "--model",
        str(export),
        "--port",
        "0",
        layout,
        "2",
        "--dtype",
        "fp32",
    ]
    env = worker_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **({} if gpus else {"CUDA_VISIBLE_DEVICES": ""}))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline, found = time.monotonic() + 240, None
        while found is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
            found = re.search(
                r"Started server process \[(\d+)\].*?Uvicorn running on (http://[\d.]+:\d+)", log.read_text(), re.DOTALL
            )
        client = openai.OpenAI(base_url=f"{found.group(2)}/v1", api_key="unused", max_retries=0, timeout=120)
        text = client.completions.create(model="model", prompt="def f(x):", max_tokens=16, temperature=0)
        model, tokenizer = from_pretrained(export, device="cuda" if gpus else "cpu"), load_tokenizer(export)
        assert text.choices[0].text == greedy_text(model, tokenizer, "def f(x):", 16)
        os.kill(int(found.group(1)), signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        print(log.read_text()[-6000:])  # shown when the test fails
