"""Touch points with other libraries' training loops (transformers' ``Trainer``); none imports them."""
