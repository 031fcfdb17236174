"""Language-model backends for the offline rewrite step (``python -m data_shards rewrite``).

Two backends share one small interface (:class:`LLMBackend`): a ``model_id`` that identifies the
model in cache keys, and ``generate(prompts, params) -> [text]``.

* :class:`HFBackend`: a local transformers causal-LM directory (``AutoModelForCausalLM`` +
  ``AutoTokenizer``, ``local_files_only=True``: nothing is ever downloaded; safetensors weights
  only, so no pickle is ever loaded). Prompts go through the tokenizer's chat template when it has
  one, else through a plain "instruction / annotations / Description:" layout.
* :class:`OpenAIBackend`: an OpenAI-compatible HTTP server (vLLM, llama.cpp, TGI, OpenAI itself)
  through ``/v1/chat/completions`` or ``/v1/completions``, with the standard library's urllib.
  Connection failures, timeouts, HTTP 408/409/429 and 5xx are retried with exponential backoff
  (``Retry-After`` honoured up to a cap); other HTTP errors fail at once. Every error names the
  endpoint URL.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

MAX_RETRY_AFTER_S = 60.0
_RETRY_STATUSES = {408, 409, 429}


class BackendError(RuntimeError):
    """A backend cannot produce text; the message names the model directory or the endpoint.

    ``partial`` maps positions in the failed call's prompt list to the answers that did arrive
    before the failure, so a caller can keep them (the rewrite cache does).
    """

    def __init__(self, message: str, *, partial: dict[int, str] | None = None):
        super().__init__(message)
        self.partial: dict[int, str] = dict(partial or {})


class EndpointError(BackendError):
    """An HTTP endpoint is unreachable or answers with an error or an unusable body."""


class _Abandoned(EndpointError):
    """A request not (re)sent because another request of the same call failed."""


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters; all of them are part of the cache key.

    Attributes:
        max_new_tokens: upper bound of generated tokens per output.
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass (ignored when greedy).
        seed: base seed; each prompt adds its own offset (see :class:`Prompt`).
    """

    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    def to_json(self) -> dict:
        """The parameters as a JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class Prompt:
    """One request: an instruction, the annotations to rewrite, and the request's seed.

    Attributes:
        instruction: what to do (the system message of a chat request).
        content: the annotation text (the user message).
        seed: the seed of this request (``params.seed`` plus the variant index).
    """

    instruction: str
    content: str
    seed: int = 0

    def plain(self) -> str:
        """The prompt as one string, for completion endpoints and tokenizers without a chat template."""
        return f"{self.instruction}\n\nAnnotations:\n{self.content}\n\nDescription:"


class LLMBackend(Protocol):
    """What the rewrite step needs from a model."""

    model_id: str

    def generate(self, prompts: list[Prompt], params: GenerationParams) -> list[str]:
        """One raw output per prompt, in order."""
        ...


# ----------------------------------------------------------------------------- transformers


def _dir_fingerprint(path: Path) -> str:
    """sha256 over the small config/tokenizer files and the names and sizes of the weight files.

    Weights are not hashed byte by byte (they can be many GB); replacing them with a file of
    another size, or changing any config, gives another fingerprint.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0")
        if file.suffix in (".json", ".model", ".txt", ".jinja") and file.stat().st_size < (16 << 20):
            digest.update(file.read_bytes())
        else:
            digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()[:16]


class HFBackend:
    """A local transformers causal LM.

    Args:
        model_dir: directory with ``config.json``, safetensors weights and the tokenizer files.
        device: torch device string ("cpu", "cuda", ...).
        batch_size: prompts per ``generate`` call (left-padded).

    Raises:
        BackendError: the directory is missing, incomplete, or cannot be loaded (message names it).

    With sampling (temperature > 0) torch is seeded per batch from the batch's prompt seeds, so
    an output depends on the batch it was generated in; the rewrite cache makes it stable across
    reruns. Greedy decoding does not depend on batching beyond padding numerics.
    """

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", batch_size: int = 8):
        path = Path(model_dir)
        if not path.is_dir():
            raise BackendError(f"{model_dir}: not a local model directory (the hf backend never downloads)")
        if not (path / "config.json").is_file():
            raise BackendError(f"{model_dir}: no config.json; expected a transformers save_pretrained directory")
        if not any(path.glob("*.safetensors")):
            raise BackendError(f"{model_dir}: no *.safetensors weights (pickled .bin weights are refused)")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise BackendError(f"{model_dir}: cannot load the model or tokenizer ({exc})") from exc
        self.model.to(device).eval()
        self.tokenizer.padding_side = "left"  # decoder-only models generate after the last token
        self.tokenizer.truncation_side = "left"  # keep the generation cue at the end of the prompt
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise BackendError(f"{model_dir}: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._torch = torch
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.model_id = f"hf:{path.resolve().name}@{_dir_fingerprint(path)}"
        self.model_dir = path

    def _render(self, prompt: Prompt) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [
                {"role": "system", "content": prompt.instruction},
                {"role": "user", "content": prompt.content},
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt.plain()

    def generate(self, prompts: list[Prompt], params: GenerationParams) -> list[str]:
        """Generate one continuation per prompt (new tokens only, special tokens removed)."""
        torch = self._torch
        outputs: list[str] = []
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        max_input = max(8, limit - params.max_new_tokens) if limit else None
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            texts = [self._render(p) for p in batch]
            enc = self.tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=max_input is not None,
                max_length=max_input,
            ).to(self.device)
            kwargs = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
            if params.temperature > 0:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
                torch.manual_seed(hash_seed([p.seed for p in batch]))
            else:
                kwargs["do_sample"] = False
            with torch.no_grad():
                generated = self.model.generate(**enc, **kwargs)  # (B, L_in + new)
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            outputs += self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return outputs


def hash_seed(seeds: list[int]) -> int:
    """A 63-bit seed derived from a list of seeds (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(json.dumps(seeds).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- HTTP


def resolve_endpoint(endpoint: str, api: str) -> str:
    """The full request URL for ``endpoint``.

    ``http://host:8000`` and ``http://host:8000/v1`` get ``/v1/chat/completions`` (api "chat") or
    ``/v1/completions`` (api "completions") appended; a URL that already ends in one of those paths
    is used as it is.
    """
    if api not in ("chat", "completions"):
        raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
    url = endpoint.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint must be an http(s) URL, got {endpoint!r}")
    if url.endswith(("/chat/completions", "/completions")):
        return url
    tail = "chat/completions" if api == "chat" else "completions"
    return f"{url}/{tail}" if url.endswith("/v1") else f"{url}/v1/{tail}"


class OpenAIBackend:
    """An OpenAI-compatible HTTP endpoint.

    Args:
        endpoint: base URL (``http://127.0.0.1:8000``) or the full request URL.
        model: the model name sent in each request (also the cache's model id).
        api: "chat" (``/v1/chat/completions``) or "completions" (``/v1/completions``).
        api_key: sent as ``Authorization: Bearer``; None sends no header.
        timeout_s: per-request timeout.
        retries: retries after the first attempt of a request.
        backoff_s: first retry delay; doubled on each further retry.
        concurrency: requests in flight at once.
        sleep: the delay function (tests pass a fast one).
    """

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api: str = "chat",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 1.0,
        concurrency: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url = resolve_endpoint(endpoint, api)
        self.api = api
        self.model = model
        self.model_id = f"openai:{model}"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retries = max(0, int(retries))
        self.backoff_s = backoff_s
        self.concurrency = max(1, int(concurrency))
        self._sleep = sleep
        self._dead = threading.Event()  # set once a request gave up: the others stop retrying

    def _body(self, prompt: Prompt, params: GenerationParams) -> dict:
        body = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": prompt.seed,
            "n": 1,
        }
        if self.api == "chat":
            body["messages"] = [
                {"role": "system", "content": prompt.instruction},
                {"role": "user", "content": prompt.content},
            ]
        else:
            body["prompt"] = prompt.plain()
        return body

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if self._dead.is_set():
                raise _Abandoned(f"{self.url}: giving up, another request to this endpoint failed")
            delay = self.backoff_s * (2**attempt)
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    return json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise EndpointError(f"{self.url}: the response is not JSON: {raw[:200]!r}") from None
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {exc.code}: {detail}"
                if exc.code not in _RETRY_STATUSES and exc.code < 500:
                    self._dead.set()
                    raise EndpointError(f"{self.url}: {last}") from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
                    delay = min(max(delay, float(retry_after)), MAX_RETRY_AFTER_S)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, cut body
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt + 1 < attempts:
                self._sleep(delay)
        self._dead.set()
        raise EndpointError(f"{self.url}: unreachable or failing after {attempts} attempt(s) ({last})")

    def _one(self, prompt: Prompt, params: GenerationParams) -> str:
        reply = self._post(self._body(prompt, params))
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.url}: unexpected response shape: {json.dumps(reply)[:200]}") from None
        if text is None:
            return ""
        if not isinstance(text, str):
            raise EndpointError(f"{self.url}: the generated text is not a string: {text!r}"[:200])
        return text

    def generate(self, prompts: list[Prompt], params: GenerationParams) -> list[str]:
        """One request per prompt, ``concurrency`` at a time.

        Raises:
            EndpointError: a request failed; its ``partial`` holds the answers received before
                the other requests stopped (requests not yet sent are cancelled).
        """
        self._dead.clear()
        answers: dict[int, str] = {}
        if self.concurrency == 1 or len(prompts) <= 1:
            try:
                for index, prompt in enumerate(prompts):
                    answers[index] = self._one(prompt, params)
            except EndpointError as exc:
                raise EndpointError(str(exc), partial=answers) from None
            return [answers[index] for index in range(len(prompts))]
        failures: list[EndpointError] = []
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, p, params) for p in prompts]
            for index, future in enumerate(futures):
                try:
                    answers[index] = future.result()
                except EndpointError as exc:
                    failures.append(exc)
                    self._dead.set()  # stop sending; requests in flight still finish
                    for pending in futures:
                        pending.cancel()
                except CancelledError:
                    pass
        if failures:  # name the request that failed, not one abandoned because of it
            cause = next((f for f in failures if not isinstance(f, _Abandoned)), failures[0])
            raise EndpointError(str(cause), partial=answers) from None
        return [answers[index] for index in range(len(prompts))]


def make_backend(
    kind: str,
    model: str,
    *,
    endpoint: str | None = None,
    api: str = "chat",
    api_key: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    timeout_s: float = 60.0,
    retries: int = 4,
    backoff_s: float = 1.0,
    concurrency: int = 4,
) -> LLMBackend:
    """Build the backend named on the command line ("hf" or "openai")."""
    if kind == "hf":
        return HFBackend(model, device=device, batch_size=batch_size)
    if kind == "openai":
        if not endpoint:
            raise BackendError("the openai backend needs --endpoint URL")
        return OpenAIBackend(
            endpoint,
            model,
            api=api,
            api_key=api_key,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            concurrency=concurrency,
        )
    raise BackendError(f"unknown backend {kind!r} (expected 'hf' or 'openai')")
