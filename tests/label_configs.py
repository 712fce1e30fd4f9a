"""Label configs that several test files share, as Label Studio would send them to /setup."""

from __future__ import annotations

# One single-choice field, `organ`, over the tiny dark and bright test images.
DARK_BRIGHT_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="organ" toName="image"><Choice value="dark"/><Choice value="bright"/></Choices>
</View>"""

# The same two classes under another field name, `shade`: tests that must not assume `organ`.
SHADE_CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="shade" toName="image">'
    '<Choice value="dark"/><Choice value="bright"/></Choices></View>'
)

# The real-Label-Studio projects: BUSI's three findings and an organ field.
ORGAN_FINDING_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="organ" toName="image">
    <Choice value="breast"/><Choice value="thyroid"/><Choice value="liver"/>
  </Choices>
  <Choices name="finding" toName="image">
    <Choice value="normal"/><Choice value="benign"/><Choice value="malignant"/>
  </Choices>
</View>"""
