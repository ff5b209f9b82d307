"""The training steps the training benchmark times: one model, its optimizer and a fixed batch per worker process.

`TrainingStep(kind, ...)` holds transformers' `CLIPModel` ("clip"), `EntityCLIPModel` ("entityclip") or open_clip's
ViT-B-32 CLIP ("open_clip", from the `bench` extra), on the CPU or a CUDA device; `Setup` is how a step runs
(precision, attention, optimizer, torch.compile, padding, allocator, device). `profile_step` says where a step goes.
"""

import dataclasses
import math

import torch
from common import (
    CLIP_EOS_TOKEN_ID,
    count_flops,
    format_table,
    peak_resident_memory_bytes,
    random_batch,
    reset_peak_resident_memory,
    timed_wall_and_cpu,
    vit_b32_clip_config,
)
from transformers import CLIPModel

# open_clip's ViT-B/32 with OpenAI's QuickGELU: the same shapes and activation as transformers' CLIP (hidden_act
# "quick_gelu"). Its text tower has a fixed context of 77 tokens (positional embedding and causal mask of 77), so its
# texts are always padded to 77, as open_clip's tokenizer does (pad id 0).
OPEN_CLIP_MODEL = "ViT-B-32-quickgelu"
OPEN_CLIP_CONTEXT = 77
KINDS = ("clip", "entityclip", "open_clip")


def open_clip_available() -> bool:
    """Whether open_clip (the `bench` extra) can be imported here."""
    try:
        import open_clip  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (torchvision without its C++ ops) raises RuntimeError
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Setup:
    """How a step runs: the options whose gains docs/performance.md reports."""

    precision: str = "fp32"  # "bf16": forward under bf16 autocast (fp32 master weights)
    attn: str = "sdpa"  # CLIP's attention implementation: "sdpa" or "eager"
    optimizer: str = "fused"  # AdamW kernel: "fused", "foreach" or "for-loop"
    compile: str = "none"  # torch.compile "encoders" (CLIP's vision and text encoders) or the whole "model"
    text_padding: int | None = None  # pad the texts to this many tokens (77 = padding="max_length"); None: none
    malloc: str = "default"  # "tuned": glibc's malloc keeps freed memory (MALLOC_TUNED at process start);
    # "mallopt": the same set from inside the process by entityclip_hf.allocator (what finetune.py does)
    device: str = "cpu"  # "cuda": the model and batch on the GPU
    model_fields: tuple[tuple[str, object], ...] = ()  # EntityCLIPConfig fields of the EntityCLIP model (variants)

    def describe(self) -> str:
        parts = [self.precision, f"attention {self.attn}", f"AdamW {self.optimizer}"]
        if self.compile != "none":
            parts.append(f"torch.compile {self.compile}")
        if self.text_padding:
            parts.append(f"texts padded to {self.text_padding}")
        if self.malloc != "default":
            parts.append(f"malloc {self.malloc}")
        if self.device != "cpu":
            parts.append(self.device)
        parts += [f"{name}={value}" for name, value in self.model_fields]
        return ", ".join(parts)

    def worker_env(self) -> dict[str, str] | None:
        return MALLOC_TUNED if self.malloc == "tuned" else None


# glibc returns freed memory of >= 32 MiB blocks (mmap) and of the heap's top (trim) to the kernel; a training step
# then page-faults the same gigabytes back in, zeroed, every step. A fixed mmap threshold at its maximum and a trim
# threshold above any heap size keep it. (jemalloc or tcmalloc through LD_PRELOAD do the same, when installed.)
MALLOC_TUNED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736"}


def pad_texts(batch: dict[str, torch.Tensor], length: int, pad_token_id: int) -> None:
    """Pad `input_ids` / `attention_mask` to `length` in place, as a processor with padding="max_length" would."""
    extra = length - batch["input_ids"].shape[1]
    if extra > 0:
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_token_id)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)


def open_clip_model_and_batch(batch_size: int, text_length: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """open_clip's ViT-B/32 (random init, as `open_clip.create_model(..., pretrained=None)` gives it) and the batch
    of the other models (same images, same texts), the texts padded with 0 to open_clip's fixed 77 tokens."""
    import open_clip

    model = open_clip.create_model(OPEN_CLIP_MODEL, pretrained=None)
    batch = random_batch(batch_size, text_length, None, seed=seed)
    if text_length > OPEN_CLIP_CONTEXT:
        raise ValueError(f"open_clip's text context is {OPEN_CLIP_CONTEXT} tokens; --text-length {text_length}")
    text = torch.nn.functional.pad(batch["input_ids"], (0, OPEN_CLIP_CONTEXT - text_length), value=0)
    # open_clip pools at the highest token id (argmax), which must be <|endoftext|>: random_token_ids draws below it.
    assert bool((text.argmax(dim=1) == text_length - 1).all()) and int(text.max()) == CLIP_EOS_TOKEN_ID
    return model, {"image": batch["pixel_values"], "text": text}


class TrainingStep:
    """One model, its AdamW optimizer and a fixed batch; `step()` runs one full training step."""

    def __init__(
        self, kind: str, batch_size: int, text_length: int, explanation_length: int, setup: Setup, seed: int,
        fields: dict | None = None,
    ):  # fmt: skip
        if setup.malloc == "mallopt":
            from entityclip_hf.allocator import keep_freed_memory

            applied, why = keep_freed_memory()
            if not applied:
                raise RuntimeError(f"--malloc mallopt: not applied here ({why})")
        self.kind, self.device = kind, torch.device(setup.device)
        config = vit_b32_clip_config(setup.attn)
        torch.manual_seed(seed)
        if kind == "open_clip":
            self.model, self.batch = open_clip_model_and_batch(batch_size, text_length, seed)
            self.clip = self.model
        elif kind in ("clip", "entityclip"):
            clip = CLIPModel(config)
            if kind == "clip":
                self.model = clip
                self.batch = random_batch(batch_size, text_length, None, seed=seed)
            else:
                from entityclip_hf import EntityCLIPConfig, EntityCLIPModel

                fields = {**dict(setup.model_fields), **(fields or {})}
                self.model = EntityCLIPModel(EntityCLIPConfig(clip_config=config, **fields))
                # The same backbone as the CLIP baseline: its weights, copied.
                self.model.clip.load_state_dict(clip.state_dict())
                del clip
                self.batch = random_batch(batch_size, text_length, explanation_length, seed=seed)
            if setup.text_padding:
                pad_texts(self.batch, setup.text_padding, config.text_config.pad_token_id)
            self.clip = self.model if kind == "clip" else self.model.clip
        else:
            raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
        self.model.to(self.device).train()
        self.batch = {key: value.to(self.device) for key, value in self.batch.items()}
        if setup.compile == "encoders":
            # EntityCLIP's own code has data-dependent shapes (which samples have an explanation, the negatives
            # drawn each step) that break a whole-model graph; the encoders are where the time goes.
            for encoder in self.encoders():
                encoder.compile()
        elif setup.compile == "model":
            # torch 2.13's AOTAutograd cache replays aliased outputs with garbage shapes from a warm cache: CLIPModel
            # returns logits_per_text as a view of logits_per_image (EntityCLIP returns a contiguous copy).
            torch._functorch.config.enable_autograd_cache = False
            self.model.compile()
        optimizer_flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-5, weight_decay=0.2, **optimizer_flags[setup.optimizer]
        )
        self.autocast = setup.precision == "bf16"
        self.compiled = setup.compile != "none"

    def encoders(self) -> list[torch.nn.Module]:
        """The vision and text encoders (what `--compile encoders` compiles)."""
        if self.kind == "open_clip":
            return [self.model.visual, self.model.transformer]
        return [self.clip.vision_model, self.clip.text_model]

    def forward_loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.kind == "open_clip":
                image_features, text_features, logit_scale = self.model(self.batch["image"], self.batch["text"])
                return self.open_clip_loss(image_features, text_features, logit_scale)
            return self.model(**self.batch, return_loss=True).loss

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Every model clamps the temperature, as open_clip and EntityCLIP's training do.
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, math.log(100))

    def step(self) -> None:
        self.forward_loss().backward()
        self.optimizer_step()

    @property
    def open_clip_loss(self):
        if not hasattr(self, "_open_clip_loss"):
            import open_clip

            self._open_clip_loss = open_clip.ClipLoss()  # open_clip's own loss, as its trainer uses it
        return self._open_clip_loss

    def warmup_flops(self) -> int:
        """The untimed warm-up (optimizer state, kernel caches, compilation), with the FLOPs of a step counted."""
        if self.compiled:
            # Compiled kernels are invisible to FlopCounterMode: compile first, then count an eager step.
            self.step()
            with torch.compiler.set_stance("force_eager"):
                return count_flops(self.step)
        return count_flops(self.step)

    def timed_step(self) -> tuple[float, float]:
        """Wall-clock and CPU seconds of one step (on CUDA, from an idle device to the step's last kernel)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

            def step_and_wait():
                self.step()
                torch.cuda.synchronize(self.device)

            return timed_wall_and_cpu(step_and_wait)
        return timed_wall_and_cpu(self.step)

    def reset_peak_memory(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return reset_peak_resident_memory()

    def peak_memory(self) -> int:
        """CPU: peak resident memory of the process; CUDA: peak memory allocated on the device (all of it this
        model's: weights, gradients, AdamW state, activations)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_resident_memory_bytes()

    def backbone_checksum(self) -> float | None:
        """A checksum of the CLIP weights (equal for CLIPModel and EntityCLIP); None for open_clip's own weights."""
        if self.kind == "open_clip":
            return None
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.clip.parameters()))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def profile(self, row_limit: int) -> str:
        return profile_step(self, row_limit)


class ComponentHooks:
    """Runs a context (`make_context(label)`) around each forward call of the named sub-modules.

    Calls are numbered per module: EntityCLIP's `clip.text_model` runs twice, #1 on the texts, #2 on the
    explanations.
    """

    def __init__(self, runner: TrainingStep, make_context):
        self.make_context = make_context
        self.open_contexts, self.calls, self.handles = [], {}, []
        names = ["clip.vision_model", "clip.text_model", "vision_experts", "text_experts", "shared_experts"]
        names += ["clip.visual", "clip.transformer"]  # open_clip's vision tower and text transformer
        for name in names:
            owner, _, attribute = name.rpartition(".")
            module = getattr(runner.clip if owner else runner.model, attribute, None)
            if module is not None:
                self.handles.append(module.register_forward_pre_hook(lambda module, args, name=name: self._enter(name)))
                self.handles.append(module.register_forward_hook(lambda module, args, output: self._leave()))

    def _enter(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        context = self.make_context(f"forward: {name} #{self.calls[name]}")
        context.__enter__()
        self.open_contexts.append(context)

    def _leave(self) -> None:
        self.open_contexts.pop().__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()


def profile_step(runner: TrainingStep, row_limit: int) -> str:
    """Where one step goes: time per phase and per forward component (torch.profiler), forward FLOPs per component
    (FlopCounterMode), then the operators by self time."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.utils.flop_counter import FlopCounterMode

    with ComponentHooks(runner, record_function), profile(activities=[ProfilerActivity.CPU]) as profiler:
        with record_function("step: forward"):
            loss = runner.forward_loss()
        with record_function("step: backward"):
            loss.backward()
        with record_function("step: optimizer"):
            runner.optimizer_step()
    events = profiler.key_averages()
    labelled = {event.key: event for event in events if event.key.startswith(("step: ", "forward: "))}
    step_time = sum(event.cpu_time_total for key, event in labelled.items() if key.startswith("step: "))

    # Forward FLOPs of each component, in a separate untimed forward pass (counting slows the ops down).
    counters: dict[str, FlopCounterMode] = {}

    def counter(label: str) -> FlopCounterMode:
        counters[label] = FlopCounterMode(display=False)
        return counters[label]

    with torch.no_grad(), ComponentHooks(runner, counter), FlopCounterMode(display=False) as whole:
        runner.forward_loss()
    forward_flops = whole.get_total_flops()
    times = {key: event.cpu_time_total / 1e6 for key, event in labelled.items()}
    flops = {key: counter.get_total_flops() for key, counter in counters.items()}
    flops["step: forward"] = forward_flops
    # What the hooks do not see: the experts' keys/values (computed outside their forward), the gates, the ITM head,
    # projections and losses.
    components = [key for key in times if key.startswith("forward: ")]
    rest = "forward: the rest (expert keys/values, gates, ITM head, losses)"
    times[rest] = times["step: forward"] - sum(times[key] for key in components)
    flops[rest] = forward_flops - sum(flops.get(key, 0) for key in components)
    rows = [
        [
            key,
            seconds,
            f"{100 * seconds / (step_time / 1e6):.1f}%",
            f"{flops[key] / 1e9:.1f}" if key in flops else "",
            f"{100 * flops[key] / forward_flops:.1f}%" if key in flops else "",
        ]
        for key, seconds in sorted(times.items(), key=lambda item: -item[1])
    ]
    component_table = format_table(
        ["phase / forward component", "CPU time (s)", "share of step", "forward GFLOP", "share of forward FLOPs"], rows
    )
    operator_table = events.table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=40)
    return component_table + "\n\n" + operator_table
