"""Stage 1 of the efficacy benchmark: pretrain a tiny CLIP on generic descriptive captions, save it as a CLIP folder.

The stand-in for OpenAI's CLIP pretraining: the model learns what "a teal jacket", "blond hair" or "a gold domed
tower under a pink sky" look like, but never meets an entity name. The folder it writes (`CLIPModel.save_pretrained`
plus `CLIPTokenizer` and `CLIPImageProcessorPil` files) is what `examples/finetune.py --model` takes, like any CLIP
checkpoint. The run is deterministic for a seed (one thread order aside) and cached: a folder whose
`stage1_info.json` records the same parameters is reused.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from efficacy_data import generic_scenes
from transformers import CLIPModel, get_scheduler

from entityclip_hf.metrics import retrieval_metrics
from entityclip_hf.tiny_models import tiny_clip_config, tiny_image_processor, train_bpe_tokenizer

INFO_FILE = "stage1_info.json"


@dataclass(frozen=True)
class Stage1Spec:
    num_scenes: int = 16000
    num_held_out: int = 500
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    hidden_size: int = 64
    num_layers: int = 2
    image_size: int = 32
    patch_size: int = 4
    vocab_size: int = 1500
    seed: int = 0


def _encode_pool(scenes, image_processor, tokenizer):
    images, captions = zip(*scenes, strict=True)
    pixels = torch.cat(
        [
            image_processor(images=list(images[i : i + 512]), return_tensors="pt")["pixel_values"]
            for i in range(0, len(images), 512)
        ]
    ).half()  # float16 halves the pool's memory; each batch goes back to float32
    tokens = tokenizer(list(captions), padding="longest", truncation=True, return_tensors="pt")
    return pixels, tokens["input_ids"], tokens["attention_mask"], list(captions)


@torch.no_grad()
def held_out_metrics(model, pixels, input_ids, attention_mask) -> dict[str, float]:
    model.eval()
    image = model.get_image_features(pixel_values=pixels.float()).pooler_output
    text = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    model.train()
    return retrieval_metrics(image, text)


def pretrain_stage1(folder: str | Path, extra_texts: list[str], spec: Stage1Spec = Stage1Spec(), log=print) -> dict:
    """Pretrain (or find cached) the stage-1 CLIP in `folder`; returns its info (parameters, held-out R@K, time).

    `extra_texts` (the entity captions and explanations stage 2 uses) join the generic captions in the tokenizer's
    training corpus, as a real CLIP's vocabulary covers the fine-tuning texts.
    """
    folder = Path(folder)
    wanted = {"spec": asdict(spec), "num_extra_texts": len(extra_texts)}
    info_path = folder / INFO_FILE
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if {key: info[key] for key in wanted} == wanted:
            log(f"stage 1: cached CLIP in {folder} (held-out rsum {info['held_out']['rsum']:.1f})")
            return info
        log(f"stage 1: {folder} was made with other parameters; pretraining again")
    started = time.time()
    torch.manual_seed(spec.seed)
    scenes = list(generic_scenes(spec.num_scenes + spec.num_held_out, spec.seed))
    tokenizer = train_bpe_tokenizer([caption for _, caption in scenes] + list(extra_texts), spec.vocab_size)
    image_processor = tiny_image_processor(spec.image_size)
    pixels, input_ids, attention_mask, _ = _encode_pool(scenes, image_processor, tokenizer)
    train_rows = torch.arange(spec.num_scenes)
    held_out = slice(spec.num_scenes, None)
    config = tiny_clip_config(
        tokenizer,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.hidden_size,
    )
    model = CLIPModel(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate,
    )
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=spec.steps)
    generator = torch.Generator().manual_seed(spec.seed)
    order = train_rows[torch.randperm(len(train_rows), generator=generator)]
    position = 0
    model.train()
    for step in range(1, spec.steps + 1):
        if position + spec.batch_size > len(order):
            order, position = train_rows[torch.randperm(len(train_rows), generator=generator)], 0
        rows = order[position : position + spec.batch_size]
        position += spec.batch_size
        mask = attention_mask[rows]
        length = int(mask.sum(1).max())
        output = model(
            input_ids=input_ids[rows, :length],
            attention_mask=mask[:, :length],
            pixel_values=pixels[rows].float(),
            return_loss=True,
        )
        output.loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 250 == 0 or step == spec.steps:
            log(f"stage 1: step {step}/{spec.steps} loss {output.loss.item():.3f} ({time.time() - started:.0f} s)")
    metrics = held_out_metrics(model, pixels[held_out], input_ids[held_out], attention_mask[held_out])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    info = {
        **wanted,
        "held_out": {key: metrics[key] for key in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "rsum")},
        "num_held_out_pairs": spec.num_held_out,
        "seconds": round(time.time() - started, 1),
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))  # last: the folder is complete
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log(f"stage 1: pretrained in {info['seconds']:.0f} s; held-out generic captions: {info['held_out']}")
    return info
