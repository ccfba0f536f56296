"""In-process generation with transformers, for machines without vLLM.

One model, one generation at a time: on a CPU two concurrent decodes only
slow each other down, and PEFT adapter switching mutates the shared model.
Decoding runs in a daemon thread; text comes back through transformers'
``AsyncTextIteratorStreamer`` (the asyncio flavour of ``TextIteratorStreamer``,
so waiting for a token costs no executor thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import (
    AsyncTextIteratorStreamer,
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from app.core.errors import (
    BackendError,
    BackendUnavailable,
    ContextLengthExceeded,
    InvalidRequest,
    KeelError,
    UnsupportedParameter,
)
from app.core.settings import BackendSettings
from app.core.types import Finished, FinishReason, GenerationRequest, LLMEvent, TextDelta, Usage

log = logging.getLogger("keel.llm.transformers")

DEFAULT_MAX_TOKENS = 256
_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto",
}
# Tokenizers without a real limit report a huge sentinel (int(1e30)); ignore anything above this.
_SANE_MAX_LEN = 10_000_000


@dataclass(slots=True)
class _Loaded:
    model: PreTrainedModel  # becomes a PeftModel once the first adapter is loaded
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    eos_ids: frozenset[int]
    device: torch.device


@dataclass(slots=True)
class _Outcome:
    token_ids: list[int]
    error: BaseException | None = None


class _StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once the consumer is gone."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopOnStrings(StoppingCriteria):
    """Ends generation on the token that completes a stop string.

    Only a tail of the output is decoded: a stop string of L characters spans at
    most 4*L byte-level tokens, and earlier matches were caught on earlier steps.
    (transformers' own ``stop_strings`` costs ~0.25 s of vocabulary preprocessing per request.)
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_len = prompt_len
        self.window = 4 * max(len(s) for s in stops) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        tail = input_ids[0, self.prompt_len:][-self.window:].tolist()
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        hit = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)


class _OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence/frequency penalties (additive, over generated tokens only), as vLLM applies them;
    transformers' ``repetition_penalty`` is multiplicative and would change the meaning."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len = prompt_len
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could be the start of a stop string."""
    for k in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        suffix = text[-k:]
        if any(s.startswith(suffix) for s in stops):
            return k
    return 0


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {spec!r} was asked for but CUDA is not available")
    return device


class TransformersBackend:
    """Serves one local model folder (and any PEFT LoRA adapters asked for) with ``model.generate``."""

    def __init__(self, name: str, settings: BackendSettings) -> None:
        self.name = name
        self.settings = settings
        self._loaded: _Loaded | None = None
        self._load_lock = asyncio.Lock()
        # Queues requests; asyncio.Lock drops a waiter that is cancelled, so it never holds the lock.
        self._gen_lock = asyncio.Lock()
        # Guards the model itself (adapter switching + generate) in case a cancelled request's
        # thread is still finishing its last step when the next one starts.
        self._model_lock = threading.Lock()
        self._adapters: dict[str, str] = {}  # adapter folder -> PEFT adapter name
        self._active_stop: threading.Event | None = None

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        async with self._load_lock:
            if self._loaded is None:
                self._loaded = await asyncio.to_thread(self._load)

    def _load(self) -> _Loaded:
        path = self.settings.model_path
        if path is None or not Path(path).is_dir():
            raise BackendUnavailable(f"backend {self.name!r}: model folder {path} does not exist")
        device = _resolve_device(self.settings.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[self.settings.dtype])
            model.to(device)
            model.eval()
        except Exception as exc:
            raise BackendUnavailable(f"backend {self.name!r} cannot load the model from {path}: {exc}") from exc
        max_len = getattr(model.config, "max_position_embeddings", None)
        if not max_len and tokenizer.model_max_length < _SANE_MAX_LEN:
            max_len = tokenizer.model_max_length
        eos = model.generation_config.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            eos_ids |= {tokenizer.eos_token_id}
        log.info("backend %r loaded %s on %s (%s, max_model_len=%s)", self.name, path, device,
                 self.settings.dtype, max_len)
        return _Loaded(model, tokenizer, int(max_len or 2048), eos_ids, device)

    async def aclose(self) -> None:
        if self._active_stop is not None:
            self._active_stop.set()
        loaded, self._loaded = self._loaded, None
        self._adapters.clear()
        if loaded is not None:
            on_cuda = loaded.device.type == "cuda"
            del loaded
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

    async def models(self) -> list[str]:
        return [self.settings.model_path.name] if self.settings.model_path else []

    async def ready(self) -> bool:
        return self._loaded is not None

    # -- generation ---------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        # aclosing: closing this generator must close the inner ones right now, not at GC time,
        # so the generation thread is stopped before the lock passes to the next request.
        try:
            async with contextlib.aclosing(self._stream(request)) as events:
                async for event in events:
                    yield event
        except KeelError:
            raise
        except Exception as exc:
            raise BackendError(f"backend {self.name!r} failed: {type(exc).__name__}: {exc}") from exc

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        p = request.params
        fmt = p.response_format
        if fmt is not None and fmt.type != "text":
            raise UnsupportedParameter(
                f"response_format {fmt.type!r} needs guided decoding, which the in-process transformers "
                f"backend {self.name!r} does not do; route this model to a vLLM backend",
                param="response_format",
            )
        if p.logprobs:
            raise UnsupportedParameter(f"the in-process transformers backend {self.name!r} does not return log "
                                       "probabilities; route this model to a vLLM backend", param="logprobs")
        if p.calls_tools:
            raise UnsupportedParameter(
                f"tool calling needs a tool-call parser and guided decoding, which the in-process transformers "
                f"backend {self.name!r} does not have; route this model to a vLLM backend (or send tool_choice "
                "'none')", param="tools",
            )
        if p.max_tokens is not None and p.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if p.n < 1:
            raise InvalidRequest("n must be at least 1", param="n")
        await self.start()
        loaded = self._loaded
        if loaded is None:  # closed while we were starting
            raise BackendUnavailable(f"backend {self.name!r} was closed")
        try:
            prompt_ids = await asyncio.to_thread(self._encode, loaded, request)
        except TemplateError as exc:  # templates raise on e.g. roles they do not accept
            raise InvalidRequest(f"the model's chat template rejected the messages: {exc}",
                                 param="messages") from exc
        except Exception as exc:
            raise BackendError(f"backend {self.name!r} cannot build the prompt: {exc}") from exc
        prompt_len = prompt_ids.shape[1]
        max_new = self._max_new_tokens(loaded, prompt_len, p.max_tokens)

        async with self._gen_lock:
            adapter_name = await self._adapter(loaded, request.adapter) if request.adapter else None
            completion_tokens = 0
            for index in range(p.n):
                seed = None if p.seed is None else p.seed + index  # choices differ, yet reproducible
                outcome: list[_Outcome] = []
                choice = self._one_choice(loaded, request, prompt_ids, max_new, adapter_name, seed, index, outcome)
                async with contextlib.aclosing(choice) as events:
                    async for event in events:
                        yield event
                completion_tokens += len(outcome[0].token_ids)
            yield Usage(prompt_len, completion_tokens)

    def _encode(self, loaded: _Loaded, request: GenerationRequest) -> torch.Tensor:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already carries the special tokens; adding them again would double the BOS.
        return loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids

    def _max_new_tokens(self, loaded: _Loaded, prompt_len: int, asked: int | None) -> int:
        room = loaded.max_model_len - prompt_len
        if asked is None:
            if room < 1:
                raise ContextLengthExceeded(
                    f"the prompt is {prompt_len} tokens, but this model's maximum context length is "
                    f"{loaded.max_model_len} tokens; shorten the messages", param="messages",
                )
            return min(DEFAULT_MAX_TOKENS, room)
        if asked > room:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {loaded.max_model_len} tokens, but "
                f"{prompt_len + asked} were requested ({prompt_len} in the messages, {asked} for the "
                f"completion); shorten the messages or lower max_tokens", param="messages",
            )
        return asked

    async def _adapter(self, loaded: _Loaded, path: str) -> str:
        key = path  # aliases pass the same configured string every time
        if key not in self._adapters:
            name = f"adapter_{len(self._adapters)}"  # PEFT names become module keys: no dots or slashes
            try:
                await asyncio.to_thread(self._load_adapter, loaded, key, name)
            except Exception as exc:
                raise BackendError(f"backend {self.name!r} cannot load LoRA adapter {path!r}: {exc}",
                                   code="adapter_load_failed") from exc
            self._adapters[key] = name
        return self._adapters[key]

    def _load_adapter(self, loaded: _Loaded, path: str, name: str) -> None:
        from peft import PeftModel  # only deployments that use adapters pay for importing peft

        if not Path(path, "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path} has no adapter_config.json")
        with self._model_lock:
            if isinstance(loaded.model, PeftModel):
                loaded.model.load_adapter(path, adapter_name=name)
            else:
                loaded.model = PeftModel.from_pretrained(loaded.model, path, adapter_name=name)
            loaded.model.eval()

    async def _one_choice(
        self, loaded: _Loaded, request: GenerationRequest, prompt_ids: torch.Tensor, max_new: int,
        adapter_name: str | None, seed: int | None, index: int, outcome: list[_Outcome],
    ) -> AsyncIterator[LLMEvent]:
        p = request.params
        stops = tuple(s for s in p.stop if s)
        prompt_len = prompt_ids.shape[1]
        stop_event = threading.Event()
        streamer = AsyncTextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        criteria = StoppingCriteriaList([_StopOnEvent(stop_event)])
        if stops:
            criteria.append(_StopOnStrings(loaded.tokenizer, stops, prompt_len))
        kwargs: dict[str, Any] = {
            "input_ids": prompt_ids.to(loaded.device),
            "attention_mask": torch.ones_like(prompt_ids, device=loaded.device),
            "max_new_tokens": max_new, "streamer": streamer, "stopping_criteria": criteria,
        }
        if p.temperature:
            # top_k=0: OpenAI sampling has no top-k, transformers would default to 50.
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p or 1.0, top_k=0)
        else:
            kwargs.update(do_sample=False)
        if p.presence_penalty or p.frequency_penalty:
            kwargs["logits_processor"] = LogitsProcessorList(
                [_OpenAIPenalties(prompt_len, p.presence_penalty or 0.0, p.frequency_penalty or 0.0)]
            )

        loop = asyncio.get_running_loop()
        done: asyncio.Future[_Outcome] = loop.create_future()
        thread = threading.Thread(
            target=self._worker, args=(loaded, kwargs, adapter_name, seed, stop_event, streamer, loop, done),
            name=f"keel-generate-{self.name}", daemon=True,
        )
        self._active_stop = stop_event
        thread.start()
        try:
            pending = ""
            stopped = False
            async for text in streamer:
                pending += text
                if stops:
                    cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        pending, stopped = pending[:cut], True
                        stop_event.set()
                        break
                    keep = _held_back(pending, stops)
                    ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
                else:
                    ready, pending = pending, ""
                if ready:
                    yield TextDelta(ready, index)
            if pending:
                yield TextDelta(pending, index)
            result = await done
            if result.error is not None:
                raise BackendError(
                    f"backend {self.name!r} failed while generating: {type(result.error).__name__}: "
                    f"{result.error}"
                ) from result.error
            outcome.append(result)
            reason = self._finish_reason(loaded, result.token_ids, max_new, stopped)
            if stop_event.is_set() and not stopped:  # aclose() pulled the plug mid-generation
                reason = "abort"
            yield Finished(reason, index)
        finally:
            # Runs on normal exit, on aclose() (consumer broke off) and on cancellation alike.
            stop_event.set()
            if not done.done():
                # Keep the generation lock until the thread has really let go of the model.
                await asyncio.shield(done)
            self._active_stop = None

    @staticmethod
    def _finish_reason(loaded: _Loaded, token_ids: list[int], max_new: int, stopped: bool) -> FinishReason:
        if stopped or (token_ids and token_ids[-1] in loaded.eos_ids):
            return "stop"
        return "length" if len(token_ids) >= max_new else "stop"

    def _worker(
        self, loaded: _Loaded, kwargs: dict[str, Any], adapter_name: str | None, seed: int | None,
        stop_event: threading.Event, streamer: AsyncTextIteratorStreamer, loop: asyncio.AbstractEventLoop,
        done: asyncio.Future[_Outcome],
    ) -> None:
        outcome = _Outcome([])
        streamer_ended = False
        try:
            with self._model_lock:
                if not stop_event.is_set():
                    if seed is not None:
                        torch.manual_seed(seed)
                    else:
                        # The RNG is process-wide: without this, one seeded request would make
                        # every later unseeded one predictable.
                        torch.seed()
                    with self._adapter_context(loaded.model, adapter_name), torch.inference_mode():
                        out = loaded.model.generate(**kwargs)
                    streamer_ended = True  # generate() calls streamer.end() when it returns normally
                    outcome.token_ids = out[0, kwargs["input_ids"].shape[1]:].tolist()
        except BaseException as exc:
            outcome.error = exc
        finally:
            if not streamer_ended:
                # Without the end marker the consumer would wait forever.
                with contextlib.suppress(Exception):
                    streamer.end()
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
                loop.call_soon_threadsafe(_resolve, done, outcome)

    @staticmethod
    def _adapter_context(model: Any, adapter_name: str | None) -> contextlib.AbstractContextManager[Any]:
        if not hasattr(model, "disable_adapter"):  # no adapter ever loaded: plain model
            return contextlib.nullcontext()
        if adapter_name is None:
            # PEFT injected LoRA layers into the base model in place, so the base must switch them off.
            return model.disable_adapter()
        model.set_adapter(adapter_name)
        return contextlib.nullcontext()


def _resolve(done: asyncio.Future[_Outcome], outcome: _Outcome) -> None:
    if not done.done():
        done.set_result(outcome)

