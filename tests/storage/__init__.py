"""Tests of engine/storage: pictures, their memory, files shared through the database."""
