"""The released-checkpoint layout (PAPER.md, "The released checkpoints"), built with transformers CLIP +
peft LoRA: tiny, random weights, non-zero LoRA B. Test-only: transformers and peft are dev tools."""

from __future__ import annotations

import torch
from torch import nn

WIDTH, LAYERS, PATCH, IMAGE, EMBED = 128, 2, 8, 32, 48   # 2 heads of 64, as OpenAI's ViTs
RANK, ALPHA = 4, 8.0


class ReleasedPerceptCLIP(nn.Module):
    """The module the released checkpoints were saved from: HF CLIP vision + peft LoRA, proj, mlp."""

    def __init__(self, outputs: int, seed: int):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(seed)
        cfg = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                               num_attention_heads=WIDTH // 64, image_size=IMAGE, patch_size=PATCH,
                               projection_dim=EMBED, hidden_act="quick_gelu")
        vision = CLIPVisionModel(cfg)
        lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.1, bias="none",
                          target_modules=["q_proj", "k_proj", "v_proj"])
        self.model = get_peft_model(vision, lora)
        self.proj = nn.Linear(WIDTH, EMBED, bias=False)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2, self.mlp.fc3 = nn.Linear(EMBED, 512), nn.Linear(512, 256), nn.Linear(256, outputs)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)       # peft starts B at zero; a trained release has it non-zero
                elif "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                    p.add_(torch.randn_like(p) * 0.1)

    def forward(self, pixels):
        pooled = self.model(pixel_values=pixels).pooler_output           # post_layernorm(class token)
        h = torch.relu(self.mlp.fc1(self.proj(pooled)))
        return self.mlp.fc3(torch.relu(self.mlp.fc2(h)))


def write_release(task, outputs, directory):
    ref = ReleasedPerceptCLIP(outputs, seed=outputs).eval()
    path = directory / f"perceptCLIP_{task}.pth"
    torch.save(ref.state_dict(), path)
    return task, ref, path
