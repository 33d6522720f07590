"""Serve a local model folder with rope-patch, offline, and check the replies
against the same server without it.

The whole recipe is one command in front of the usual one:

    rope-patch run -- transformers serve /path/to/model --device cpu --port 8000

This demo saves a small random-weight Llama and a word-level tokenizer
(built from scratch with the ``tokenizers`` library: nothing is downloaded)
to a temporary folder, starts ``transformers serve`` on it twice, under
``rope-patch run`` and as is, with HF_HUB_OFFLINE=1, sends the same greedy
completion and chat requests to both and prints the replies.

    .venv/bin/pip install "transformers[serving]>=5,<6"    # fastapi, uvicorn, openai, accelerate...
    .venv/bin/python examples/serve_local_model.py [--continuous-batching]

Needs transformers 5.x (4.57's serve command has no completions endpoint
and its continuous batching cannot start on CPU). With
``--continuous-batching`` on CPU, give the paged cache a size
(``--cb-num-blocks``, ``--cb-max-batch-tokens``): without them transformers
sizes it from free RAM (about 15 GB on a 24 GB machine, for any model).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import torch
import transformers

NEW_TOKENS = 16


def save_model(folder):
    """A random-weight Llama and its tokenizer, as save_pretrained writes
    them: what a downloaded checkpoint folder holds."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    words = [f"w{i}" for i in range(128)] + ["user", "assistant", "system", ":"]
    tokenizer = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids
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
    model.generation_config.eos_token_id = None  # random weights: no end token, every reply is NEW_TOKENS long
    model.save_pretrained(folder)


def script(name):
    """A console script of this interpreter's environment (rope-patch, transformers)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else shutil.which(name) or sys.exit(f"{name} not found")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port, path, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def serve_and_ask(folder, patched, extra):
    """Start the server, wait for /health, send the requests, stop it; the reply texts."""
    port = free_port()
    command = [script("transformers"), "serve", folder, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    command += extra
    if patched:
        command = [script("rope-patch"), "run", "--", *command]
    scripts = {script("transformers"), script("rope-patch")}
    print("$", " ".join(os.path.basename(part) if part in scripts else part for part in command))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                sys.exit(f"the server exited with {server.returncode}:\n{server.stderr.read()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    sys.exit("the server did not start within 180 s")
                time.sleep(0.25)
        greedy = {"model": folder, "max_tokens": NEW_TOKENS, "temperature": 0}
        completion = post(port, "/v1/completions", dict(greedy, prompt="w1 w2 w3 w4 w5"))
        chat = post(port, "/v1/chat/completions", dict(greedy, messages=[{"role": "user", "content": "w40 w41 w42"}]))
        return completion["choices"][0]["text"], chat["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:  # the continuous-batching worker thread can keep it alive
            server.kill()
            server.wait()


def main():
    if int(transformers.__version__.split(".")[0]) < 5:
        sys.exit(f"this demo needs transformers 5.x (found {transformers.__version__})")
    extra = []
    if "--continuous-batching" in sys.argv[1:]:
        extra = ["--continuous-batching", "--cb-num-blocks", "16", "--cb-max-batch-tokens", "256"]
    with tempfile.TemporaryDirectory() as folder:
        save_model(folder)
        print(f"model folder: {folder} ({', '.join(sorted(os.listdir(folder)))})")
        patched = serve_and_ask(folder, True, extra)
        unpatched = serve_and_ask(folder, False, extra)
    print(f"patched   completion: {patched[0]}\n          chat:       {patched[1]}")
    print(f"unpatched completion: {unpatched[0]}\n          chat:       {unpatched[1]}")
    print(f"replies identical: {patched == unpatched}")
    sys.exit(0 if patched == unpatched else 1)


if __name__ == "__main__":
    main()
