"""Fine-tuning molmoe models: the objective (`loss`), the JSONL data (`data`), the FSDP2 training
loop (`trainer`). docs/training.md is the user's guide."""
from molmoe.training.loss import LB_COEF, Z_COEF, TrainingLoss, moe_layers, training_loss

__all__ = ["LB_COEF", "Z_COEF", "TrainingLoss", "moe_layers", "training_loss"]
