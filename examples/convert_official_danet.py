"""Convert a DANet head written as the official code writes it, and see the memory a training
step saves.

    python examples/convert_official_danet.py                 # 2048 -> 512 channels, 64x64 map (a GPU)
    python examples/convert_official_danet.py --size 48 --in-channels 256   # a CPU, in seconds

The head below has the structure of junfu1115/DANet (encoding/nn/da_att.py PAM_Module and
CAM_Module, encoding/models/sseg/danet.py DANetHead), written out here so the example runs
alone; in a project that has them, convert that model instead. "Memory" is what the training
step keeps for the backward pass (the tensors autograd saves, counted once each), and on CUDA
also the peak allocation.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import attnseg


class PAM_Module(nn.Module):  # official structure: query/key 1x1 convs to C // 8, value to C, gamma
    def __init__(self, in_dim):
        super().__init__()
        self.chanel_in = in_dim
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.shape
        query = self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)
        attention = self.softmax(torch.bmm(query, self.key_conv(x).view(b, -1, h * w)))  # N x N
        out = torch.bmm(self.value_conv(x).view(b, -1, h * w), attention.permute(0, 2, 1))
        return self.gamma * out.view(b, c, h, w) + x


class CAM_Module(nn.Module):  # official structure: softmax(rowmax(E) - E) over the C x C Gram matrix
    def __init__(self, in_dim):
        super().__init__()
        self.chanel_in = in_dim
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.shape
        flat = x.view(b, c, -1)
        energy = torch.bmm(flat, flat.permute(0, 2, 1))
        attention = self.softmax(torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy)
        return self.gamma * torch.bmm(attention, flat).view(b, c, h, w) + x


def conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DANetHead(nn.Module):  # official names: conv5a, conv5c, sa, sc, conv51, conv52, conv6/7/8
    def __init__(self, in_channels, out_channels):
        super().__init__()
        inter = in_channels // 4
        self.conv5a, self.conv5c = conv_bn_relu(in_channels, inter), conv_bn_relu(in_channels, inter)
        self.sa, self.sc = PAM_Module(inter), CAM_Module(inter)
        self.conv51, self.conv52 = conv_bn_relu(inter, inter), conv_bn_relu(inter, inter)
        self.conv6, self.conv7, self.conv8 = (
            nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(inter, out_channels, 1)) for _ in range(3))

    def forward(self, x):
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        return self.conv8(sa_conv + sc_conv), self.conv6(sa_conv), self.conv7(sc_conv)


def training_step_memory(model, x, target):
    """(loss, MiB of tensors saved for the backward, peak CUDA MiB or None) of one training step."""
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    torch.manual_seed(0)  # the same dropout masks for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = model(x)
    loss = sum(nn.functional.cross_entropy(out, target) for out in outputs)
    loss.backward()
    peak = (torch.cuda.max_memory_allocated() - start) / 2**20 if x.is_cuda else None
    return loss.item(), sum(saved.values()) / 2**20, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-channels", type=int, default=2048)
    parser.add_argument("--size", type=int, default=64, help="feature map height and width (N = size^2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    official = DANetHead(args.in_channels, 19).to(args.device)
    with torch.no_grad():  # a trained head has gamma != 0
        official.sa.gamma.fill_(0.5)
        official.sc.gamma.fill_(0.5)
    converted = copy.deepcopy(official)
    converted, report = attnseg.convert_model(converted, return_report=True)
    print(report)

    x = torch.randn(args.batch, args.in_channels, args.size, args.size, device=args.device)
    target = torch.randint(0, 19, (args.batch, args.size, args.size), device=args.device)
    loss_official, saved_official, peak_official = training_step_memory(official, x, target)
    loss_converted, saved_converted, peak_converted = training_step_memory(converted, x, target)
    n = args.size * args.size
    print(f"feature map {args.size}x{args.size} (N = {n}); one N x N fp32 map = {n * n * 4 / 2**20:.1f} MiB")
    print(f"loss: official {loss_official:.6f}, converted {loss_converted:.6f}")
    print(f"saved for backward: official {saved_official:.1f} MiB, converted {saved_converted:.1f} MiB "
          f"({saved_official - saved_converted:.1f} MiB less)")
    if peak_official is not None:
        print(f"peak CUDA memory of the step: official {peak_official:.1f} MiB, converted {peak_converted:.1f} MiB")
    grads_match = all(torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5)
                      for a, b in zip(official.parameters(), converted.parameters()))
    print(f"gradients match: {grads_match}")
    return 0 if grads_match and abs(loss_official - loss_converted) <= 1e-4 * abs(loss_official) else 1


if __name__ == "__main__":
    raise SystemExit(main())
