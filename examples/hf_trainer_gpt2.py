"""SOURCE on a Hugging Face Trainer run, end to end on CPU in seconds (no downloads).

A tiny GPT-2 (built from a config) learns a synthetic language of six topics: each document is a sequence of
words drawn from one topic's vocabulary. The Trainer fine-tunes it with its defaults (AdamW, linear schedule,
gradient clipping at 1.0), saving checkpoints; `TrainingRun.from_hf_trainer` reads the run back from its
output_dir (steps, learning rates, clipping, Adam's v̂) and SOURCE attributes held-out documents to the training
documents. A query's strongest proponents should be documents of its own topic: the script prints them and the
share of same-topic documents among each query's top 10 (chance: one in six).

    python examples/hf_trainer_gpt2.py                 # needs the `hf` extra: pip install -e .[hf]
    python examples/hf_trainer_gpt2.py --out-dir runs/gpt2_topics --epochs 6
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

TOPICS, WORDS_PER_TOPIC, MAX_LEN = 6, 6, 14
PAD = TOPICS * WORDS_PER_TOPIC  # the padding id (masked out)


class TopicDocuments(torch.utils.data.Dataset):
    """Hugging Face-style items (input_ids, attention_mask, labels) of documents drawn from one topic each."""

    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.topics = torch.arange(n) % TOPICS
        lengths = torch.randint(8, MAX_LEN + 1, (n,), generator=gen)
        words = torch.randint(0, WORDS_PER_TOPIC, (n, MAX_LEN), generator=gen) + self.topics[:, None] * WORDS_PER_TOPIC
        self.mask = (torch.arange(MAX_LEN)[None, :] < lengths[:, None]).long()
        self.ids = words.masked_fill(self.mask == 0, PAD)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.ids[i].masked_fill(self.mask[i] == 0, -100)}


def main(argv=None) -> dict:
    import transformers

    import source_fast as sf

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=None, help="the Trainer's output_dir (default: a temporary folder)")
    parser.add_argument("--train-docs", type=int, default=240)
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="sf_hf_trainer_"))

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=PAD + 1, n_positions=MAX_LEN, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    train, queries = TopicDocuments(args.train_docs, seed=1), TopicDocuments(args.queries, seed=2)
    batch, steps_per_epoch = 16, -(-args.train_docs // 16)
    training = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=args.epochs, learning_rate=5e-3,
        save_strategy="steps", save_steps=max(1, args.epochs * steps_per_epoch // 6), logging_steps=1,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=train)
    trainer.remove_callback(transformers.PrinterCallback)  # a line per logged step (logging_steps=1: every update)
    result = trainer.train()
    if not args.quiet:
        print(f"trained {result.global_step} updates, mean training loss {result.training_loss:.3f}")

    task = sf.CausalLMTask()
    # The Trainer's loss is a mean over the batch's predicted tokens; the task's sums a document's tokens.
    run = sf.TrainingRun.from_hf_trainer(out, model, num_segments=3, loss_scale=task.token_mean_loss_scale(train))
    analyzer = sf.SourceAnalyzer(model, task, run, batch_size=64, progress=False)
    _, proponents = analyzer.top_k(queries, train, k=10)
    same_topic = (train.topics[proponents] == queries.topics[:, None]).double().mean(1)
    if not args.quiet:
        print(run.describe())
        for q in range(len(queries)):
            print(f"query {q} (topic {int(queries.topics[q])}): top proponents' topics "
                  f"{train.topics[proponents[q]].tolist()}")
    summary = {"precision_at_10": float(same_topic.mean()), "chance": 1 / TOPICS, "checkpoints": len(run.checkpoints),
               "output_dir": str(out)}
    print(f"same-topic share of each query's 10 strongest proponents: {summary['precision_at_10']:.2f} "
          f"(chance {summary['chance']:.2f}); {summary['checkpoints']} checkpoints in {out}")
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
