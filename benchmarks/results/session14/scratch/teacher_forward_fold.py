# Scratch (session 14): a teacher forward with and without its BatchNorms folded, 2 rounds; output in teacher_forward_fold.txt
import torch, time, copy
from torch.nn.utils.fusion import fuse_conv_bn_eval
torch.set_num_threads(2)
from gmpq_core.models import build_model
def fold(m):
    m = copy.deepcopy(m).eval()
    import torch.fx as fx
    gm = fx.symbolic_trace(m)
    mods = dict(gm.named_modules())
    n=0
    for node in gm.graph.nodes:
        if node.op=="call_module" and isinstance(mods[node.target], torch.nn.BatchNorm2d):
            prev = node.args[0]
            if prev.op=="call_module" and isinstance(mods[prev.target], torch.nn.Conv2d) and len(prev.users)==1:
                conv = fuse_conv_bn_eval(mods[prev.target], mods[node.target])
                m.set_submodule(prev.target, conv); m.set_submodule(node.target, torch.nn.Identity()); n+=1
    return m, n
for name, px in [("resnet18", 32), ("resnet20", 28)]:
    m = build_model(name, num_classes=10, in_channels=1 if name=="resnet20" else 3).eval() if True else None
    c = 1 if name=="resnet20" else 3
    f, n = fold(m)
    x = torch.randn(64, c, px, px).to(memory_format=torch.channels_last)
    m = m.to(memory_format=torch.channels_last); f = f.to(memory_format=torch.channels_last)
    with torch.no_grad(): print(name, n, (m(x)-f(x)).abs().max().item())
    def t(mod):
        with torch.no_grad():
            for _ in range(3): mod(x)
            s=time.perf_counter()
            for _ in range(10): mod(x)
            return (time.perf_counter()-s)/10*1e3
    for r in range(2): print(name, "orig", round(t(m),1), "fold", round(t(f),1))
