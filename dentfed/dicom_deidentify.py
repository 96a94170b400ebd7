"""`dentfed data deidentify`: DICOM PS3.15 Annex E Basic Application Level Confidentiality
Profile with pydicom, for clinics that want to share a test set.

pydicom ships no de-identification profile; dicognito and deid (PyPI) pseudonymise with fake
values or recipes rather than applying the Basic Profile's actions. So the profile's actions are
applied here from the table below (PS3.15 Table E.1-1, without the retain-* options):
X remove, Z empty (type-2 attributes that must stay present), U replace the UID with a new one
(consistently within a run, so series and references stay linked). On top of the table, every
private tag, every person name (VR PN), overlays and curves are removed, and the result is
marked with Patient Identity Removed = YES and the profile's code (DCM 113100). Pixel data is
not inspected: a file that says it has burned-in annotation is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from shared.atomic_files import atomic_folder
from shared.data.readers import is_dicom
from shared.errors import DentfedError

Z = (  # type-2 in most IODs: kept, emptied
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName", "StudyID", "ContentDate", "ContentTime",
    "ContentCreatorName", "VerifyingObserverName", "VerifyingObserverIdentificationCodeSequence",
    "GraphicAnnotationSequence", "PersonName", "ContrastBolusAgent", "AcquisitionContextSequence",
    "InstitutionCodeSequence", "ReferencedPatientPhotoSequence", "DateTime", "Date", "Time",
)
X = (  # removed
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence", "StationName", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
    "RequestingPhysician", "RequestingService", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence",
    "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "PatientAge", "PatientSize", "PatientWeight",
    "PatientAddress", "PatientTelephoneNumbers", "PatientTelecomInformation", "MilitaryRank",
    "BranchOfService", "MedicalRecordLocator", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "PatientComments", "PatientReligiousPreference",
    "CountryOfResidence", "RegionOfResidence", "MedicalAlerts", "Allergies", "SmokingStatus",
    "PregnancyStatus", "LastMenstrualDate", "PatientInsurancePlanCodeSequence", "PatientState",
    "PatientSexNeutered", "PatientBreedDescription", "ResponsiblePerson",
    "ResponsibleOrganization", "ResponsiblePersonRole", "AdmissionID", "AdmittingDate",
    "AdmittingTime", "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence",
    "DischargeDiagnosisDescription", "CurrentPatientLocation", "PatientInstitutionResidence",
    "VisitComments", "ServiceEpisodeID", "ServiceEpisodeDescription", "InsurancePlanIdentification",
    "StudyDescription", "SeriesDescription", "ImageComments", "FrameComments",
    "DerivationDescription", "ProtocolName", "PerformedProcedureStepID",
    "PerformedProcedureStepDescription", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "PerformedLocation", "PerformedStationName",
    "ScheduledProcedureStepID", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledPerformingPhysicianName", "RequestedProcedureID", "RequestedProcedureDescription",
    "RequestAttributesSequence", "ReasonForStudy", "ReasonForTheRequestedProcedure",
    "RequestedContrastAgent", "StudyComments", "RequestedProcedureComments",
    "ImagingServiceRequestComments", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "OrderEnteredBy", "OrderEntererLocation",
    "OrderCallbackPhoneNumber", "DeviceSerialNumber", "DeviceUID", "PlateID", "CassetteID",
    "GantryID", "DetectorID", "GeneratorID", "SoftwareVersions", "SeriesDate", "SeriesTime",
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "InstanceCreationDate",
    "InstanceCreationTime", "InstanceCreatorUID", "OverlayDate", "OverlayTime", "CurveDate",
    "CurveTime", "StudyArrivalDate", "StudyArrivalTime", "StudyVerifiedDate",
    "StudyVerifiedTime", "StudyReadDate", "StudyReadTime", "StudyCompletionDate",
    "StudyCompletionTime", "ReferencedPatientSequence", "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence", "ReferencedImageSequence", "SourceImageSequence",
    "OriginalAttributesSequence", "ModifiedAttributesSequence", "DigitalSignaturesSequence",
    "DataSetTrailingPadding", "TextString", "TextComments", "IdentifyingComments",
    "AuthorObserverSequence", "ParticipantSequence", "CustodialOrganizationSequence",
    "PersonIdentificationCodeSequence", "PersonAddress", "PersonTelephoneNumbers",
    "PersonTelecomInformation", "EvaluatorName", "InterpretationRecorder",
    "InterpretationTranscriber", "InterpretationAuthor", "InterpretationApproverSequence",
    "DistributionName", "DistributionAddress", "ScheduledStationName", "ScheduledStudyLocation",
    "ScheduledStudyLocationAETitle", "StationAETitle", "ScheduledStationAETitle",
    "PerformedStationAETitle", "PerformingPhysicianName", "ReviewerName", "SecondaryReviewerName",
    "AcquisitionComments", "ContributionDescription", "LabelText", "BarcodeValue",
    "SpecimenAccessionNumber", "ContainerIdentifier", "ContainerDescription",
    "ReferencedFrameOfReferenceUID", "ReferencedPatientAliasSequence", "PatientAlias",
    "PatientPrimaryLanguageCodeSequence", "StudyIDIssuer", "CurrentObserverTrial",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription", "ClinicalTrialCoordinatingCenterName",
)
KEEP_UIDS = {  # UIDs that name a class or syntax, not an instance: never replaced
    "SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID", "ImplementationClassUID",
    "ReferencedSOPClassUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
    "PrivateInformationCreatorUID", "RelatedGeneralSOPClassUID", "OriginalSpecializedSOPClassUID",
    "MappingResource", "ContextUID",
}
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")


@dataclass
class Deidentifier:
    """One run: UIDs map to the same new UID across every file of the run."""

    uid_map: dict[str, str] = field(default_factory=dict)

    def _uid(self, old: str) -> str:
        if old not in self.uid_map:
            self.uid_map[old] = generate_uid()
        return self.uid_map[old]

    def _clean(self, ds: Dataset) -> None:
        ds.remove_private_tags()
        for elem in list(ds):
            tag = elem.tag
            if tag.group & 0xFF00 in (0x5000, 0x6000) and tag.group % 2 == 0:
                del ds[tag]  # curves (50xx) and overlays (60xx)
                continue
            kw = elem.keyword
            if kw in X:
                del ds[tag]
            elif kw in Z or elem.VR == "PN":
                ds[tag].value = [] if elem.VR == "SQ" else ""
            elif elem.VR == "UI" and kw not in KEEP_UIDS and elem.value:
                vals = elem.value if elem.VM > 1 else [elem.value]
                new = [self._uid(str(v)) for v in vals]
                ds[tag].value = new if elem.VM > 1 else new[0]
            elif elem.VR == "SQ":
                for item in elem.value:
                    self._clean(item)

    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify `ds` in place (file meta included) and return it."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise DentfedError("burned-in annotation: the pixels may show identifiers, which "
                               "this tool does not clean")
        self._clean(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "DICOM PS3.15 Basic Application Level Confidentiality " \
                                    "Profile (dentfed)"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = [code]
        return ds


def deidentify_tree(src: str | Path, out: str | Path) -> list[Path]:
    """De-identify one DICOM file or every DICOM file under a folder into `out` (same relative
    layout; non-DICOM files are not copied). All or nothing: files go to a temporary folder
    beside `out`, renamed into place at the end. Returns the written files."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DentfedError(f"{src}: not found")
    if out.exists() and any(out.iterdir()):
        raise DentfedError(f"output folder {out} exists and is not empty")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*")
                                                if p.is_file() and is_dicom(p))
    if not files:
        raise DentfedError(f"{src}: no DICOM files (.dcm, .dicom or the DICM marker)")
    deid = Deidentifier()
    written = []
    with atomic_folder(out) as tmp:
        for f in files:
            rel = Path(f.name) if src.is_file() else f.relative_to(src)
            try:
                ds = pydicom.dcmread(str(f))
                deid.dataset(ds)
            except DentfedError as e:
                raise DentfedError(f"{rel}: {e}") from None
            except Exception as e:
                raise DentfedError(f"{rel}: not a readable DICOM file ({type(e).__name__})"
                                   ) from None
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(str(target), enforce_file_format=False)
            written.append(out / rel)
    return written
