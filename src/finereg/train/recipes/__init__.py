"""The engine's methods, one recipe class each, grouped by the family of the library they wire: weight penalties
(:mod:`.weight`), feature penalties (:mod:`.feature`), output losses (:mod:`.head`), and the robust fine-tuning
methods: optimizer wrappers, TPGM, LP-FT (:mod:`.robust`). Importing this package
registers them; the order of registration is the order of ``finereg methods`` and of the bench's table."""

# isort: skip_file
from . import weight  # noqa: F401
from . import feature  # noqa: F401
from . import head  # noqa: F401
from . import robust  # noqa: F401
