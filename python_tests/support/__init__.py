"""Helpers shared by the test files (fixtures, inputs, dispatch spies); no tests here."""
