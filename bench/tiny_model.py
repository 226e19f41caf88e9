"""Tiny random Llama-style chat models for the LLM rungs' tests and benches (built here, nothing downloaded).

The tokenizer is character level (one token per character, so answer length in characters is
answer length in tokens) with a small chat template. head_dim is 64 because vLLM's CPU
attention rejects smaller heads.
"""

import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list(string.ascii_letters + string.digits + " .,:;!?+-*/=()<>'\"\n")
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(folder, seed=0, layers=1, tie=False, counter=False, start_len=16):
    """Save a small random Llama (hidden 128, 2 heads of 64, vocab ~90) and its tokenizer to `folder`.

    counter=False: every matrix N(0, 0.08): a chaotic random model (fine for exactness tests).
    counter=True: weights N(0, 0.02) plus one readable mechanism whose answer length moves
    smoothly with the weights, so that ES can shorten it within a few generations:
      - attention is uniform (q = k = 0), so layer 0 sees the mean of the context;
      - the filler token 'a' carries a flag (direction w) in its embedding; value channel 0
        reads it and o_proj writes it along direction u: the residual stream holds
        g * (share of 'a' tokens so far) along u, which grows with every generated 'a';
      - the output layer prefers 'a' (row aligned with the 'a' and '<|assistant|>' embeddings)
        and the end-of-turn row is c * u: the answer is 'aaa...' until the growing share makes
        <|end|> win. c is calibrated so greedy answers to the training prompts start at about
        `start_len` characters; raising c (or g, or the flag) shortens them gradually.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=512, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if counter else 0.08))
        if counter:
            emb, head = model.model.embed_tokens.weight, model.lm_head.weight
            u, w = torch.linalg.qr(torch.randn(128, 2, generator=gen))[0].T  # orthonormal directions
            emb.copy_(torch.randn(emb.shape, generator=gen))
            emb -= torch.outer(emb @ u, u) + torch.outer(emb @ w, w)
            filler = tokenizer.convert_tokens_to_ids("a")
            assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
            emb[filler] += 4 * w
            for layer in model.model.layers[:1]:
                layer.self_attn.q_proj.weight.zero_()
                layer.self_attn.k_proj.weight.zero_()
                layer.self_attn.v_proj.weight[0] += w
                layer.self_attn.o_proj.weight[:, 0] += 3 * u
            prefer = emb[filler] / emb[filler].norm() + emb[assistant] / emb[assistant].norm()
            head[filler] = 0.6 * prefer
            lo, hi = 0.0, 8.0  # bisect the end-of-turn gain c for answers of about start_len chars
            for _ in range(20):
                c = (lo + hi) / 2
                head[tokenizer.eos_token_id] = c * u
                if _mean_answer_length(model, tokenizer) > start_len:
                    lo = c
                else:
                    hi = c
            head[tokenizer.eos_token_id] = hi * u
    folder = Path(folder)
    model.config.dtype = "bfloat16"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder


TRAIN_PROMPTS = ["Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]


def _mean_answer_length(model, tokenizer, max_new_tokens=24):
    lengths = []
    for q in TRAIN_PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        lengths.append(out.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in out else len(out))
    return sum(lengths) / len(lengths)
