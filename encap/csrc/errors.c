/* encap._native: the CodecError the codecs raise (reason, detail), imported by
 * module.c's exec_module. Reference: encap/errors.py.
 */

static PyObject *codec_error; /* encap.errors.CodecError */

static PyObject *raise_codec(const char *reason, const char *detail)
{
    PyObject *err = PyObject_CallFunction(codec_error, "ss", reason, detail);
    if (err != NULL) {
        PyErr_SetObject(codec_error, err);
        Py_DECREF(err);
    }
    return NULL;
}
