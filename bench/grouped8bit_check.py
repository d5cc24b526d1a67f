"""CUDA: grouped vs bitsandbytes per-tensor equality (test model + SD1.5 shapes) and step timings."""
import json, sys, time
import torch
import bitsandbytes as bnb
sys.path.insert(0, ".")
from optimizer.grouped8bit import GroupedAdamW8bit, GroupedLion8bit
from tests.test_grouped8bit import make_model, HYPER

dev = "cuda"
out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "bnb": bnb.__version__}

def grouped(kind, params, **kw):
    return (GroupedAdamW8bit if kind == "adam" else GroupedLion8bit)(params, **HYPER[kind], **kw)
def ref(kind, params):
    return (bnb.optim.AdamW8bit if kind == "adam" else bnb.optim.Lion8bit)(params, **HYPER[kind])

# 1. test model on CUDA, small chunks, fp32 and bf16
for dtype in (torch.float32, torch.bfloat16):
    for kind in ("adam", "lion"):
        a, b = make_model().to(dev, dtype), make_model().to(dev, dtype)
        oa, ob = ref(kind, a.parameters()), grouped(kind, b.parameters(), chunk_elements=32768)
        sa = torch.optim.lr_scheduler.LambdaLR(oa, lambda s: 1 / (1 + s)); sb = torch.optim.lr_scheduler.LambdaLR(ob, lambda s: 1 / (1 + s))
        for step in range(6):
            g = torch.Generator(device=dev).manual_seed(step)
            for i, (pa, pb) in enumerate(zip(a.parameters(), b.parameters())):
                gr = (torch.randn(pa.shape, device=dev, generator=g) * (1 + i % 5)).to(dtype)
                pa.grad, pb.grad = gr.clone(), gr.clone()
            oa.step(); ob.step(); sa.step(); sb.step()
            for gb, pb_ in ob._buffers.values():
                gb.fill_(float("nan")); pb_.fill_(1e30)
        diff = max((pa.float() - pb.float()).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
        exact = all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
        # states
        params, rparams = ob.param_groups[0]["params"], oa.param_groups[0]["params"]
        bad = 0; total = 0
        for c in ob._chunks:
            st = ob.state[params[c.indices[0]]]
            for i, off in zip(c.indices, c.offsets):
                r = oa.state[rparams[i]]; n = params[i].numel()
                for k in ("state1", "state2"):
                    if k in r:
                        bad += (st[k][off:off + n] != r[k].flatten()).sum().item(); total += n
                for k in ("absmax1", "absmax2"):
                    if k in r:
                        f = off // 256
                        bad += (st[k][f:f + r[k].numel()] != r[k]).sum().item(); total += r[k].numel()
        out[f"test_model_{kind}_{str(dtype)[6:]}"] = {"max_param_diff": diff, "bit_exact": exact, "state_mismatches": bad, "state_elements": total}
print(json.dumps(out), flush=True)

# 2. SD1.5 shapes: UNet + CLIP-L text encoder
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
with torch.device("meta"):
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408))
shapes = [p.shape for p in unet.parameters()] + [p.shape for p in te.parameters()]
out["sd15"] = {"tensors": len(shapes), "params": sum(s.numel() for s in shapes)}
torch.manual_seed(0)
base = [torch.randn(s, device=dev) * 0.02 for s in shapes]
grads = [torch.randn(s, device=dev) * 1e-3 for s in shapes]

def make_params():
    ps = [torch.nn.Parameter(b.clone()) for b in base]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps

def timeit(opt, steps=20, warmup=3):
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1000

res = {}
for name, mk in [("bnb_AdamW8bit", lambda p: bnb.optim.AdamW8bit(p, lr=1e-6, weight_decay=0.01)),
                 ("GroupedAdamW8bit", lambda p: GroupedAdamW8bit(p, lr=1e-6, weight_decay=0.01)),
                 ("bnb_Lion8bit", lambda p: bnb.optim.Lion8bit(p, lr=1e-7, weight_decay=0.1)),
                 ("GroupedLion8bit", lambda p: GroupedLion8bit(p, lr=1e-7, weight_decay=0.1)),
                 ("torch_AdamW_fused", lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.01, fused=True))]:
    ps = make_params()
    opt = mk(ps)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); m0 = torch.cuda.memory_allocated()
    ms = timeit(opt)
    res[name] = {"ms_per_step": round(ms, 2), "opt_memory_GiB": round((torch.cuda.max_memory_allocated() - m0) / 2**30, 3)}
    if name.startswith("Grouped"):
        res[name]["temp_buffers_GiB"] = round(sum(g.numel() * g.element_size() * 2 for g, _ in opt._buffers.values()) / 2**30, 3)
        res[name]["chunks"] = len(opt._chunks)
    del opt, ps; torch.cuda.empty_cache()
out["sd15"]["timing"] = res
print(json.dumps(out), flush=True)

# 3. SD1.5 equality over 3 steps (same grads), adam and lion
for kind in ("adam", "lion"):
    pa, pb = make_params(), make_params()
    oa = bnb.optim.AdamW8bit(pa, lr=1e-3, weight_decay=0.01) if kind == "adam" else bnb.optim.Lion8bit(pa, lr=1e-4, weight_decay=0.1)
    ob = GroupedAdamW8bit(pb, lr=1e-3, weight_decay=0.01) if kind == "adam" else GroupedLion8bit(pb, lr=1e-4, weight_decay=0.1)
    for s in range(3):
        for g in grads:
            g.mul_(-1.1)
        oa.step(); ob.step()
    diffs = [(x - y).abs().max().item() for x, y in zip(pa, pb)]
    out["sd15"][f"equal_{kind}"] = {"max_param_diff": max(diffs), "tensors_not_bit_exact": sum(d > 0 for d in diffs)}
    del oa, ob, pa, pb; torch.cuda.empty_cache()
print(json.dumps(out), flush=True)
