"""Let torchvision's Python parts import when its compiled operators cannot load.

PyPI's torchvision wheels for Linux are built against the CUDA build of torch. With the
CPU build of the same torch version, torchvision's `_C` extension fails to load (it links
libtorch_cuda), which torchvision tolerates, but `torchvision._meta_registrations` then
registers a fake kernel for `torchvision::nms` unconditionally and the import fails with
"operator torchvision::nms does not exist".

The reference code (transforms, open_clip, BLIP, torchmetrics) uses none of torchvision's
compiled operators (nms, roi_align, deform_conv2d, image decoding), so where they are
missing this hook replaces that one module with an empty one; every other module of
torchvision is imported as shipped. Where the operators load, it does nothing, and a
call to a missing operator still fails loudly with torchvision's own message.

Installed into the reference environment by setup_env.sh (a .pth file imports it at start).
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "torchvision._meta_registrations"


class _SkipMetaRegistrations(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        import torchvision.extension  # already imported by torchvision/__init__ at this point

        if torchvision.extension._has_ops():
            return None  # the compiled operators are there: import the real module
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module):
        module.__doc__ = "Skipped: torchvision's compiled operators are not loaded (see torchvision_python_only)."


sys.meta_path.insert(0, _SkipMetaRegistrations())
