"""The shipped ImageFolder configs' 224-pixel pipelines at 32 pixels, for tests that run them on tiny folders."""

SMALL_IMAGES = """
data:
  init_args:
    source:
      init_args: {image_size: 32}
    batch_size: 6
    eval_batch_size: 6
    num_workers: 0
    train_transform:
      class_path: torchvision.transforms.v2.Compose
      init_args:
        transforms:
          - class_path: torchvision.transforms.v2.RandomResizedCrop
            init_args: {size: 32, scale: [0.5, 1.0]}
          - class_path: torchvision.transforms.v2.RandomHorizontalFlip
          - class_path: torchvision.transforms.v2.ToImage
          - class_path: torchvision.transforms.v2.ToDtype
            init_args: {dtype: torch.float32, scale: true}
          - class_path: torchvision.transforms.v2.Normalize
            init_args: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
"""
"""A YAML file to add after an ImageFolder config: 32-pixel pictures, batches of 6, no worker processes."""
