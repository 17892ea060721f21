"""vssm's model families, registered with timm on import (``import vssm`` then ``timm.create_model``)."""
from . import vim  # noqa: F401
from . import vmamba  # noqa: F401
from . import diffussm  # noqa: F401
