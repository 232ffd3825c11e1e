"""medvlm: build biomedical vision-language assistants the LLaVA-Med / STLLaVA-Med way.

RESEARCH USE ONLY - NOT FOR CLINICAL USE. See :data:`medvlm.notice.NOTICE`.
"""

from medvlm.notice import NOTICE

__version__ = "0.1.0"
__all__ = ["NOTICE", "__version__"]
