"""Teachers behind one interface: ``create_teacher(family, source, **overrides)``.

Families: ``siglip2``, ``dinov3``, ``sam3`` and the generic ``vit`` (one file each). Importing this package registers them.
"""

from featcache.teachers import dinov3, sam3, siglip2, vit  # noqa: F401  (registration)
from featcache.teachers.base import (Teacher, TeacherOutput, create_teacher, describe_teacher, families,
                                    family_class, teacher_parameters)
from featcache.teachers.spec import TeacherSpec

__all__ = ["Teacher", "TeacherOutput", "TeacherSpec", "create_teacher", "describe_teacher", "families", "family_class",
           "teacher_parameters"]
