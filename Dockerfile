# The image of every Ray pod of k8s/rayservice.yaml, head and workers: Ray 2.60 on Python 3.11 (Ray's own image),
# torch 2.14.1 + torchvision 0.29.1, then this project. From the repository root (docs/kubernetes.md):
#
#   docker build -t registry.example.com/omni-serve:0.1.0 .
#
# The weights are not in the image: the pods mount them (k8s/models-pvc.yaml).
FROM rayproject/ray:2.60.0-py311

# torch and torchvision first and pinned, as scripts/setup.sh installs them: pyproject's loose `torch>=2.9` would
# take whatever is newest, and the Qwen3-Omni processor cannot even be built without a matching torchvision. PyPI's
# Linux wheels are CUDA builds that bring their CUDA libraries; the NVIDIA runtime mounts the driver.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

# The project, installed (not a checkout on the path): Serve imports services.* in every replica and the proxies.
COPY --chown=ray:users pyproject.toml /tmp/omni-serve/
COPY --chown=ray:users services /tmp/omni-serve/services
RUN pip install --no-cache-dir /tmp/omni-serve && rm -rf /tmp/omni-serve

ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
