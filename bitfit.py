"""BitFit (Ben Zaken et al., 2021): fine-tune only the bias terms.

Every bias of the transformer trains (the query, key, value and output projections', the MLP's and the
layer norms'); every weight matrix, embedding and layer-norm scale stays frozen. Nothing is added to the
model, so a fresh BitFit model computes exactly the pretrained one. For gpt2-medium that is 11 biases of
n_embd or 4 n_embd per block plus the final layer norm's: 24 x 11 x 1024 + 1024 = 271,360 parameters.
"""


def mark_only_biases_as_trainable(model):
    """Freeze every parameter of model except its biases; returns model."""
    for name, param in model.named_parameters():
        param.requires_grad = name.endswith(".bias")
    return model
