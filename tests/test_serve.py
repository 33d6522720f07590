"""A real server: ``rope-patch run -- transformers serve MODEL_FOLDER`` answers
OpenAI-style requests exactly like the same server without rope-patch, and
its rotary calls are answered from the tables.

Offline (HF_HUB_OFFLINE=1): the model is a small random-weight Llama saved
with ``save_pretrained``, with a word-level tokenizer built from scratch
with the ``tokenizers`` library (its tokens are ``w0``, ``w1``, ... and no
special tokens, so a reply's text spells every generated token). Each
parameter starts two servers at once, patched and unpatched, sends the same
greedy requests to both and compares the replies; then every Python process of each server writes
whether rope_patch is active there and what its rotary modules hold
(``rope_patch.cache_info``) when sent SIGUSR1, through a ``sitecustomize``
of the test's own that ``rope-patch run`` chains to. The model may live in
another process than the API: transformers 5.25's serve loads each model in
a process of its own, started with multiprocessing's *spawn* context
(``transformers/cli/serving/model_manager.py``: ``EngineClient``). Every
process the server starts inherits the environment, and so the reporter;
the test asks them all, and proves the claims in the one that holds the
model.

transformers 5.x: plain ``generate`` and ``--continuous-batching``; three
completions of different lengths sent at once (so the batching loop can
pack them), then a chat completion. transformers 4.57: its serve command has only
(streamed) chat completions, and its continuous batching cannot start on
CPU (its cache sizing subtracts from the CPU's total memory, which it
reports as None: TypeError in the batching thread, and the request is
never answered), so that mode is skipped there.

Needs what transformers' "serving" extra installs (fastapi, uvicorn, openai,
pydantic, starlette, accelerate; rich on 5.x): rope-patch's ``test`` extra
has them (``pip install -e ".[test]"``); skipped without them.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
import transformers

from tests.conftest import subprocess_env
from tests.models import transformers_major

#: transformers' is_serve_available() checks the first four; from_pretrained's
#: device_map (serve always passes one) needs accelerate.
for _module in ("fastapi", "uvicorn", "openai", "pydantic", "accelerate"):
    pytest.importorskip(
        _module,
        reason=f"serving extras not installed ({_module}): pip install -e '.[test]' "
        f"(or 'transformers[serving]=={transformers.__version__}')",
    )

V5 = transformers_major() >= 5
if not hasattr(signal, "SIGUSR1"):
    pytest.skip("the server reports its tables on SIGUSR1 (POSIX only)", allow_module_level=True)

NEW_TOKENS = 16
COMPLETION_PROMPTS = ("w1 w2 w3 w4 w5", " ".join(f"w{i}" for i in range(10, 31)), "w7 w8 w9 w10 w11 w12 w13 w14 w15")
CHAT = [{"role": "user", "content": "w40 w41 w42 w43 w44 w45"}]
START_TIMEOUT = 180  # seconds until /health answers (about 6 s here)

#: The user's sitecustomize, chained to by ``rope-patch run``'s own, so it
#: runs at the start of every Python process the server starts (a spawned
#: model process included). It marks the process as one that answers
#: SIGUSR1 (a process without the handler would be killed by it), and on
#: SIGUSR1 writes, per process, whether rope_patch is active there and what it
#: holds for every rotary module alive.
REPORTER = """
import json, os, signal

_folder = os.environ["ROPE_PATCH_TEST_REPORTS"]


def _report(signum, frame):
    import gc
    import sys

    import torch

    import rope_patch

    # transformers 5.25's model process calls gc.freeze() once the model is
    # loaded (cli/serving/utils.py), and get_objects() skips frozen objects:
    # unfreeze to look, and freeze again as it was.
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    objects = gc.get_objects()
    if frozen:
        gc.freeze()
    rows = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module) and type(obj).__name__.endswith("RotaryEmbedding"):
            info = rope_patch.cache_info(obj)
            tables = [{"dtype": str(t.dtype), "positions": t.positions, "verified": t.verified} for t in info.tables]
            rows.append({"class": type(obj).__name__, "answered": info.answered, "fallback": info.fallback,
                         "tables": tables})
    report = {"pid": os.getpid(), "argv": sys.argv[:2], "patched": rope_patch.is_patched(), "rotaries": rows}
    path = os.path.join(_folder, f"report.{os.getpid()}.json")
    with open(path + ".part", "w") as stream:
        json.dump(report, stream)
    os.replace(path + ".part", path)


signal.signal(signal.SIGUSR1, _report)
open(os.path.join(_folder, f"listening.{os.getpid()}"), "w").close()
"""


def model_in_its_own_process():
    """Whether this transformers' serve loads the model in a spawned process
    of its own (5.25's ``EngineClient``; before it, the API process holds it)."""
    try:
        from transformers.cli.serving import model_manager
    except ImportError:  # 4.57: no serving package
        return False
    return hasattr(model_manager, "EngineClient")


MODEL_IN_ITS_OWN_PROCESS = model_in_its_own_process()


def running(pid):
    """Whether ``pid`` is a live process (not a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc: trust kill
        return True


def build_model_folder(folder):
    """A random-weight Llama and a word-level tokenizer, saved like a hub
    checkpoint (config, safetensors, tokenizer files, chat template)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    words = [f"w{i}" for i in range(128)] + ["user", "assistant", "system", ":"]
    tokenizer = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No token_type_ids: 4.57's tokenizer would return them and generate() refuses them.
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_input_names=["input_ids", "attention_mask"]
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None  # no end token: every reply has NEW_TOKENS tokens
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_model_folder(str(folder))
    return str(folder)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def transformers_command():
    """The ``transformers`` console script of this interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "transformers")
    return script if os.path.exists(script) else shutil.which("transformers")


class Server:
    """``transformers serve FOLDER`` on a free localhost port, under
    ``rope-patch run`` or not, with the reporter sitecustomize on PYTHONPATH."""

    def __init__(self, folder, tmp_path, name, patched, extra_args):
        self.port = free_port()
        self.reports = tmp_path / f"{name}-reports"
        self.reports.mkdir()
        reporter = tmp_path / f"{name}-site"
        reporter.mkdir()
        (reporter / "sitecustomize.py").write_text(REPORTER)
        env = subprocess_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ROPE_PATCH_TEST_REPORTS=str(self.reports))
        env["PYTHONPATH"] = os.pathsep.join([str(reporter), env["PYTHONPATH"]])
        model = [folder] if V5 else ["--force_model", folder]  # 4.57 has no positional model argument
        serve = [transformers_command(), "serve", *model, "--device", "cpu", "--dtype", "float32"]
        serve += ["--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        command = [sys.executable, "-m", "rope_patch.cli", "run", "--", *serve] if patched else serve
        self.log = open(tmp_path / f"{name}.log", "w+")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, deadline):
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited with {self.process.returncode}:\n{self.output()}"
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        pytest.fail(f"server not ready after {START_TIMEOUT} s:\n{self.output()}")

    def post(self, path, body):
        """The JSON reply, or for a streamed one (``text/event-stream``) the
        list of its ``data:`` events."""
        request = urllib.request.Request(
            self.url(path), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                payload = reply.read().decode()
                streamed = reply.headers.get_content_type() == "text/event-stream"
        except urllib.error.HTTPError as error:
            pytest.fail(f"{path}: HTTP {error.code} {error.read()[:500]!r}\n{self.output()}")
        if not streamed:
            return json.loads(payload)
        events = [line[len("data: ") :] for line in payload.splitlines() if line.startswith("data: ")]
        return [json.loads(event) for event in events if event.strip() != "[DONE]"]

    def ask_for_tables(self):
        """Signal every live process of the server that listens for it (the
        API process and what it started) to write its report; returns their
        pids. Read the reports with tables()."""
        for report in self.reports.glob("report.*"):
            report.unlink()
        pids = [int(marker.name.split(".")[1]) for marker in self.reports.glob("listening.*")]
        self.asked = [pid for pid in pids if running(pid)]
        for pid in self.asked:
            os.kill(pid, signal.SIGUSR1)
        return self.asked

    def tables(self):
        """Each asked process's report (after ask_for_tables): its pid,
        whether rope_patch is active in it, and what rope_patch holds for each
        of its rotary modules, one row per module."""
        deadline = time.monotonic() + 60
        waiting = set(self.asked)
        while waiting:
            waiting = {pid for pid in waiting if not (self.reports / f"report.{pid}.json").exists() and running(pid)}
            assert time.monotonic() < deadline, f"no report from processes {sorted(waiting)}:\n{self.output()}"
            assert self.process.poll() is None, self.output()
            time.sleep(0.1)
        reports = []
        for pid in self.asked:
            path = self.reports / f"report.{pid}.json"
            if path.exists():
                reports.append(json.loads(path.read_text()))
        return reports

    def model_process(self):
        """The report of the one process that holds the model's rotary
        modules (after ask_for_tables)."""
        reports = self.tables()
        holders = [report for report in reports if report["rotaries"]]
        assert len(holders) == 1, reports
        if MODEL_IN_ITS_OWN_PROCESS:  # the spawned model process, not the API's
            assert holders[0]["pid"] != self.process.pid, reports
        else:
            assert holders[0]["pid"] == self.process.pid, reports
        return holders[0]

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:  # a continuous-batching worker thread can keep it alive
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


def chat_text(reply):
    """The assistant's text: from the JSON reply (5.x), or joined from the
    streamed chunks (4.57 streams every chat completion)."""
    if isinstance(reply, dict):
        assert reply["usage"]["completion_tokens"] == NEW_TOKENS, reply
        assert reply["choices"][0]["finish_reason"] == "length", reply
        return reply["choices"][0]["message"]["content"]
    assert not any("error" in chunk for chunk in reply), reply
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in reply if chunk.get("choices"))


def replies(server, folder):
    """The server's replies to the same greedy requests. 5.x: three
    completions at once (continuous batching packs them together), then a
    chat; 4.57 (chat only): three chats, one after the other."""
    prompts = COMPLETION_PROMPTS
    if V5:

        def complete(prompt):
            body = {"model": folder, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
            return server.post("/v1/completions", body)

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            completions = list(pool.map(complete, prompts))
        for reply in completions:  # every token generated, none hidden from the text
            assert reply["usage"]["completion_tokens"] == NEW_TOKENS, reply
            assert reply["choices"][0]["finish_reason"] == "length", reply
        texts = [reply["choices"][0]["text"] for reply in completions]
        chats = [CHAT]
    else:
        texts = []
        chats = [CHAT] + [[{"role": "user", "content": prompt}] for prompt in prompts[1:]]
    for messages in chats:
        body = {"model": folder, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0}
        texts.append(chat_text(server.post("/v1/chat/completions", body)))
    assert all(len(text.split()) == NEW_TOKENS for text in texts), texts
    return texts


@pytest.mark.parametrize("mode", ["generate", "continuous-batching"])
def test_rope_patch_run_transformers_serve_replies_like_the_unpatched_server(model_folder, tmp_path, mode):
    if mode == "continuous-batching" and not V5:
        pytest.skip("transformers 4.57's continuous batching cannot start on CPU (TypeError sizing its cache)")
    # Sized: on CPU, 5.x otherwise sizes the paged cache from free RAM (~15 GB per server
    # on a 24 GB machine, so the second server is OOM-killed).
    extra = ["--continuous-batching", "--cb-num-blocks", "16", "--cb-max-batch-tokens", "256"]
    extra = extra if mode == "continuous-batching" else []
    servers = {}
    try:
        for name, patched in (("patched", True), ("unpatched", False)):
            servers[name] = Server(model_folder, tmp_path, name, patched, extra)
        deadline = time.monotonic() + START_TIMEOUT
        for server in servers.values():
            server.wait_ready(deadline)

        expected = replies(servers["unpatched"], model_folder)
        assert replies(servers["patched"], model_folder) == expected

        for server in servers.values():
            server.ask_for_tables()
        patched, unpatched = servers["patched"].model_process(), servers["unpatched"].model_process()
        # The process holding the model is patched, and its calls are answered from tables.
        assert patched["patched"], patched
        rotaries = patched["rotaries"]
        assert [row["class"] for row in rotaries] == ["LlamaRotaryEmbedding"], patched
        assert rotaries[0]["answered"] and rotaries[0]["fallback"] is None, patched
        longest = max(len(prompt.split()) for prompt in COMPLETION_PROMPTS) + NEW_TOKENS
        assert any(t["verified"] and t["positions"] >= longest for t in rotaries[0]["tables"]), patched
        assert not unpatched["patched"], unpatched
        assert not any(row["answered"] or row["tables"] for row in unpatched["rotaries"]), unpatched
    finally:
        for server in servers.values():
            server.stop()
